"""A configuration file read again when it changes, without a restart (the JWKS and the access policy).

An invalid new version is refused and the last good one kept, with an error log line: a typo in a policy
being rolled out must not lock every caller out, nor open the service.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
_Parsed = TypeVar("_Parsed")


class WatchedFileError(ValueError):
    """The file cannot be read or parsed at start-up."""


class WatchedFile(Generic[_Parsed]):
    """`parse(bytes)` of a file, re-read at most every `check_interval_s` when its bytes differ.

    `parse` raises ValueError for an invalid version. Reading a small file once a second costs less than
    trusting modification times, which miss a same-size rewrite within one timestamp tick.
    """

    def __init__(
        self,
        path: Path,
        parse: Callable[[bytes], _Parsed],
        *,
        what: str,
        check_interval_s: float = 1.0,
    ) -> None:
        self.path = path
        self._parse = parse
        self._what = what
        self._interval_s = check_interval_s
        self._lock = threading.Lock()
        try:
            self._raw = path.read_bytes()
            self._value = parse(self._raw)
        except (OSError, ValueError) as error:
            raise WatchedFileError(f"{what} {path}: {error}") from None
        self._rejected: bytes | None = None
        self._next_check = time.monotonic() + check_interval_s

    def current(self) -> _Parsed:
        """The last good version, after a check for a new one when the interval has passed."""
        if time.monotonic() >= self._next_check:
            self._check()
        return self._value

    def _check(self) -> None:
        with self._lock:
            if time.monotonic() < self._next_check:
                return  # another thread just checked
            self._next_check = time.monotonic() + self._interval_s
            try:
                raw = self.path.read_bytes()
            except OSError as error:
                log.error("cannot re-read %s, keeping the version in use", self._what, extra={"error": str(error)})
                return
            if raw == self._raw or raw == self._rejected:
                return
            try:
                value = self._parse(raw)
            except ValueError as error:
                self._rejected = raw
                log.error(
                    "invalid new version of the %s refused, keeping the version in use",
                    self._what,
                    extra={"path": str(self.path), "error": str(error)},
                )
                return
            self._raw, self._value, self._rejected = raw, value, None
            log.info("%s reloaded", self._what, extra={"path": str(self.path)})
