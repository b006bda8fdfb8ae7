"""Drive the server with h2load, a C load generator that costs little CPU, replaying one prepared gRPC call.

A unary gRPC call is an HTTP/2 POST with `content-type: application/grpc`,
`te: trailers` and a body of one length-prefixed message (a zero byte for "not
compressed", the length as 4 bytes big-endian, the message). h2load checks only
the HTTP status, not grpc-status, so every prepared request is first sent once
with a real client and must succeed (see scenarios.py).
"""

from __future__ import annotations

import re
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def available() -> bool:
    return shutil.which("h2load") is not None


def grpc_frame(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


@dataclass(frozen=True)
class LoadResult:
    rps: float
    p50_ms: float
    p99_ms: float
    succeeded: int
    failed: int
    # h2load's CPU seconds per wall second (1.0 = one core busy): near 1, the load generator is the bottleneck.
    load_generator_cpu: float = 0.0


def run(
    address: str, method: str, message: bytes, *, requests: int, in_flight: int, connections: int = 1
) -> LoadResult:
    """`requests` calls of `method` with at most `in_flight` concurrent streams over `connections` connections."""
    streams = max(1, in_flight // connections)
    with tempfile.TemporaryDirectory() as scratch:
        body = Path(scratch) / "body"
        body.write_bytes(grpc_frame(message))
        log = Path(scratch) / "log"
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        result = subprocess.run(
            [
                "h2load",
                "-n",
                str(requests),
                "-c",
                str(connections),
                "-m",
                str(streams),
                "-t",
                "1",
                "-H",
                "content-type: application/grpc",
                "-H",
                "te: trailers",
                "-d",
                str(body),
                f"--log-file={log}",
                f"http://{address}{method}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        wall_s = time.perf_counter() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # h2load is the only child reaped meanwhile
        cpu_s = sum(getattr(children_after, f) - getattr(children_before, f) for f in ("ru_utime", "ru_stime"))
        latencies_us = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line.strip())
    rps_match = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", result.stdout)
    counts = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed", result.stdout)
    if rps_match is None or counts is None or not latencies_us:
        raise RuntimeError(f"unexpected h2load output:\n{result.stdout}\n{result.stderr}")
    quantiles = statistics.quantiles(latencies_us, n=100, method="inclusive")
    return LoadResult(
        rps=float(rps_match.group(1)),
        p50_ms=quantiles[49] / 1000,
        p99_ms=quantiles[98] / 1000,
        succeeded=int(counts.group(1)),
        failed=int(counts.group(2)),
        load_generator_cpu=cpu_s / wall_s,
    )


def version() -> str:
    if not available():
        return "not installed"
    return subprocess.run(["h2load", "--version"], capture_output=True, text=True, check=False).stdout.strip()
