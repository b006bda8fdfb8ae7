"""`python -m tests.reliability.clocked_server`: `python -m crypto_server` on a clock that the test moves.

Replica tests of time-driven behaviour (automatic rotation, its lease) run real processes that a test can kill,
so they cannot share an in-process FakeClock: every process reads the time from one file that the test rewrites
(`FileClock`). This entry point is the only way to run the service on it: it lives under tests/, and nothing in
crypto_server reads the file or the variable that names it, so no setting can turn it on in production.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta
from pathlib import Path

from crypto_server.__main__ import main

CLOCK_FILE_VARIABLE = "TEST_CLOCK_FILE"


class FileClock:
    """The time written in a file (ISO 8601, UTC), read on every call: processes reading it move together."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def now(self) -> datetime:
        return datetime.fromisoformat(self.path.read_text())

    def set(self, moment: datetime) -> None:
        """Written whole or not at all (a rename), so that a reader never sees half a timestamp."""
        partial = self.path.with_suffix(".partial")
        partial.write_text(moment.isoformat())
        os.replace(partial, self.path)

    def advance(self, delta: timedelta) -> None:
        self.set(self.now() + delta)


if __name__ == "__main__":
    raise SystemExit(main(clock=FileClock(Path(os.environ[CLOCK_FILE_VARIABLE]))))
