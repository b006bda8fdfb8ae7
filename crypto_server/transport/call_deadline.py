"""The current RPC's deadline, for code far from gRPC that must not outlive it.

The middleware sets it for the duration of each call. Storage adapters do not
read it themselves: the composition root (app.py) hands them `time_left`, so
that a database round trip is bounded by whatever time the caller has left.
"""

from __future__ import annotations

import time
from contextvars import ContextVar, Token

_deadline: ContextVar[float | None] = ContextVar("call_deadline", default=None)


def enter_call(remaining_s: float | None) -> Token[float | None]:
    """From now until leave_call(token), the call has `remaining_s` seconds left (None: no deadline)."""
    return _deadline.set(None if remaining_s is None else time.monotonic() + remaining_s)


def leave_call(token: Token[float | None]) -> None:
    _deadline.reset(token)


def time_left(cap_s: float) -> float:
    """Seconds until the current call's deadline, at most `cap_s` (and never negative)."""
    deadline = _deadline.get()
    if deadline is None:
        return cap_s
    return max(0.0, min(cap_s, deadline - time.monotonic()))
