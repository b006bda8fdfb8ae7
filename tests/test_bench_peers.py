"""bench/peers.py: the closed-loop harness, the process-tree CPU reading, the ratios, and moto's KMS emulation as a
peer (a real moto_server process on 127.0.0.1). No figure is asserted: only that each part measures what it says."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import peers, processes


def test_closed_loop_counts_expected_failures_and_keeps_going() -> None:
    counter = itertools.count()

    def every_other_call_fails() -> None:
        if next(counter) % 2:
            raise ValueError("refused")

    sample = peers.closed_loop(
        [every_other_call_fails, every_other_call_fails], 0.05, failures=(ValueError,), server_pid=os.getpid()
    )

    assert sample.calls >= 2
    assert 0 < sample.failed < sample.calls
    assert sample.p50_ms <= sample.p99_ms


def test_closed_loop_stops_on_an_error_it_was_not_told_to_expect() -> None:
    def broken() -> None:
        raise KeyError("a bug in the benchmark")

    with pytest.raises(RuntimeError, match="load generator failed"):
        peers.closed_loop([broken], 0.05, failures=(ValueError,), server_pid=os.getpid())


def test_process_tree_includes_the_children_of_a_server() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        assert child.pid in processes.process_tree(os.getpid())
        assert processes.process_tree(child.pid) == [child.pid]
    finally:
        child.kill()
        child.wait()


def test_ratios_are_ours_over_moto() -> None:
    def figures(rps: float, p50_ms: float, cpu_ms: float) -> dict[str, object]:
        return {
            "rps": {"median": rps},
            "p50_ms": {"median": p50_ms},
            "server_cpu_ms_per_call": {"median": cpu_ms},
            "harness_cpu_ms_per_call": {"median": cpu_ms},
        }

    phases = peers.PeerPhases(repetitions=1, seconds=1.0, threads=(1,))
    measured = {
        "ours": {operation: {"1": figures(1000, 1.0, 0.5)} for operation in peers.OPERATIONS},
        "moto": {operation: {"1": figures(100, 10.0, 2.0)} for operation in peers.OPERATIONS},
    }

    ratio = peers.ratios(measured, phases, cores=2)["encrypt"]["1"]
    # 2 cores at 0.5 + 0.5 ms of CPU per call (harness + server): at most 2,000 calls/s, 20 x moto's 100.
    assert ratio == {
        "rps_ratio": 10.0,
        "p50_ratio": 0.1,
        "server_cpu_per_call_ratio": 0.25,
        "machine_ceiling_rps": 2000.0,
        "machine_ceiling_rps_ratio": 20.0,
    }
    (target,) = peers.targets_met(peers.ratios(measured, phases, cores=2), phases)
    assert target["met"] is False  # 10 x the rate is short of 15 x
    assert target["reachable_on_this_machine"] is True  # though the machine's ceiling is above it
    (target,) = peers.targets_met(peers.ratios(measured, phases, cores=1), phases)
    assert target["reachable_on_this_machine"] is False  # one core: 1,000 calls/s at most, 10 x


def test_moto_kms_emulation_answers_every_measured_operation(tmp_path: Path) -> None:
    with peers.moto_server(tmp_path / "moto.log") as (endpoint, pid):
        target = peers.moto_target(endpoint, pid, clients=2)  # checks Decrypt and GenerateDataKey answers
        for operation in peers.OPERATIONS:
            sample = peers.closed_loop(
                target.operations[operation], 0.05, failures=target.failures, server_pid=target.pid
            )
            assert sample.calls >= 2
            assert sample.failed == 0
