"""Waiting for another process or thread: the one polling helper the tests share.

Only for what a test cannot drive itself: a real server process starting, a replica hearing of a change, a
background thread's pass. Time the test controls (cache lifetimes, key expiry, rotation periods) moves with
the injected clock instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")


def eventually(
    condition: Callable[[], _T],
    *,
    timeout_s: float,
    what: str,
    interval_s: float = 0.02,
    ignoring: tuple[type[BaseException], ...] = (),
) -> _T:
    """Call `condition` until it returns a truthy value, and return that value.

    Fails with an AssertionError naming `what` (and the last ignored error) after `timeout_s`. Errors of
    the types in `ignoring` count as "not yet", e.g. a connection refused while a server starts.
    """
    deadline = time.monotonic() + timeout_s
    last_error: BaseException | None = None
    while True:
        try:
            outcome = condition()
            if outcome:
                return outcome
        except ignoring as error:
            last_error = error
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error is not None else ""
            raise AssertionError(f"{what}: not within {timeout_s}s{detail}")
        # A real process or thread makes the progress polled for; the pause leaves it the CPU.
        time.sleep(interval_s)
