"""A pass run every few seconds on a thread of its own, for the service's background duties."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from crypto_server.domain.errors import StoreUnavailable

log = logging.getLogger(__name__)


class Periodic:
    """Runs `action` every `interval_s` (never when the interval is 0) until stopped.

    A pass that meets an unavailable store logs `skipped` and the next pass comes on time; any other failure is
    logged with its traceback. Neither ends the thread.
    """

    def __init__(self, action: Callable[[], object], interval_s: float, *, name: str, skipped: str) -> None:
        self._action = action
        self._interval_s = interval_s
        self._name = name
        self._skipped = skipped
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._interval_s <= 0:
            return
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            try:
                self._action()
            except StoreUnavailable:
                log.warning(self._skipped)
            except Exception:
                log.exception("%s pass failed", self._name)

    def stop(self) -> bool:
        """Stop the thread (after its current pass); True the first time, so the owner's last step runs once."""
        if self._stopping.is_set():
            return False
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        return True
