"""Stand-in workers for tests/test_supervisor.py, under the real supervisor: `python -m tests.supervised_stub`
with CRYPTO_PROCESSES=2 supervises two of these. Each reports serving to its supervisor and waits for SIGTERM,
unless the file named by STUB_FAIL_FILE exists: then it fails at start-up with exit code 2, as a worker with a
bad configuration does. STUB_FIRST_BACKOFF_S, when set, replaces the supervisor's first restart back-off (0.25 s),
so a test of the doubling back-offs need not wait out production's (7.75 s for five restarts)."""

from __future__ import annotations

import json
import os
import signal
import threading

from crypto_server import supervisor
from crypto_server.__main__ import main as supervisor_main
from crypto_server.app import HEALTH_SERVICES
from crypto_server.supervisor import REPORT_FD
from crypto_server.transport.health import SERVING


def worker() -> int:
    if os.path.exists(os.environ["STUB_FAIL_FILE"]):
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop.set())
    report = int(os.environ[REPORT_FD])
    os.write(report, json.dumps({"serving": True, "pid": os.getpid(), "metrics_port": None}).encode() + b"\n")
    while not stop.wait(0.1):
        os.write(report, json.dumps({"health": dict.fromkeys(HEALTH_SERVICES, SERVING)}).encode() + b"\n")
    return 0


if __name__ == "__main__":
    supervised = REPORT_FD in os.environ
    if "STUB_FIRST_BACKOFF_S" in os.environ:
        supervisor.FIRST_BACKOFF_S = float(os.environ["STUB_FIRST_BACKOFF_S"])
    raise SystemExit(worker() if supervised else supervisor_main(worker_module="tests.supervised_stub"))
