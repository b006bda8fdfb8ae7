"""A short `make chaos` run in CI: the same harness, a fixed seed, every invariant checked."""

from __future__ import annotations

from pathlib import Path

from tests.reliability.chaos import run, violations


def test_a_short_chaos_run_keeps_every_promise(tmp_path: Path) -> None:
    # Opened by the database frozen and thawed in short cycles for longer than a usage pass (5 s): what made
    # usage counts give reservations back twice and go negative (issue 22), which a schedule without it missed.
    # Then a fail-over (fail points on every kind of round trip).
    opening = [("freeze mongo cycles", 8.0), ("failover mongo", 3.0)]
    report = run(seed=11, duration_s=30.0, workdir=tmp_path, opening=opening)
    assert [fault["fault"] for fault in report["faults"][:2]] == ["freeze mongo cycles", "failover mongo"]
    assert report["calls_ok"].get("Encrypt", 0) > 50
    assert report["usage_counts"]["versions_checked"] > 0
    assert not violations(report), report
