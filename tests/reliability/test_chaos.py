"""A short `make chaos` run in CI: the same harness, a fixed seed, every invariant checked."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.chaos import run, violations


def test_a_short_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    report = run(seed=11, duration_s=25.0, workdir=tmp_path)
    assert report["faults"], "the scheduler injected faults"
    assert report["calls_ok"].get("Encrypt", 0) > 50
    assert not violations(report), report
