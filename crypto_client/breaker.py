"""A circuit breaker shared by the sync and asyncio clients.

closed --(failure_threshold consecutive transport failures)--> open
open   --(reset_timeout_s elapsed; the next call is the probe)--> half-open
half-open --(probe succeeds)--> closed;  --(probe fails)--> open again
open   --(the channel reconnected after being down: reconnected())--> the next call is the probe, at once

While open, and while a half-open probe is in flight, calls fail at once with
CircuitOpenError, without touching the network. Only transport failures count
(errors.is_transport_failure); an answer from the service, even an error,
proves it reachable.

Hand-written rather than pybreaker: pybreaker's asynchronous support is for
Tornado, not asyncio; it lets every call through while half-open instead of
one probe; and it reads the wall clock, which tests cannot control. This class
does no I/O and holds its lock only for bookkeeping, so it is safe from threads
and from an event loop alike.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable

from crypto_client.config import BreakerPolicy
from crypto_client.errors import CircuitOpenError

log = logging.getLogger("crypto_client.breaker")


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(
        self,
        policy: BreakerPolicy,
        *,
        name: str = "crypto",
        clock: Callable[[], float] = time.monotonic,
        on_transition: Callable[[BreakerState, BreakerState], None] | None = None,
    ) -> None:
        self._policy = policy
        self._name = name
        self._clock = clock
        self._listeners: list[Callable[[BreakerState, BreakerState], None]] = []
        if on_transition is not None:
            self._listeners.append(on_transition)
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._consecutive_failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    def add_listener(self, listener: Callable[[BreakerState, BreakerState], None]) -> None:
        """Call `listener(old, new)` on every transition (outside the breaker's lock)."""
        self._listeners.append(listener)

    @property
    def state(self) -> BreakerState:
        with self._lock:
            return self._state

    def before_call(self) -> None:
        """Admit a call, or raise CircuitOpenError."""
        with self._lock:
            if self._state is BreakerState.CLOSED:
                return
            if self._state is BreakerState.OPEN:
                waited = self._clock() - self._opened_at
                if waited < self._policy.reset_timeout_s:
                    raise CircuitOpenError(
                        f"circuit open after {self._consecutive_failures} transport failures; "
                        f"next probe in {self._policy.reset_timeout_s - waited:.2f}s"
                    )
                transition = self._move(BreakerState.HALF_OPEN)
            elif self._probe_in_flight:
                raise CircuitOpenError("circuit half-open: a probe call is in flight")
            else:
                transition = None
            self._probe_in_flight = True
        self._announce(transition)

    def record_success(self) -> None:
        with self._lock:
            self._consecutive_failures = 0
            self._probe_in_flight = False
            transition = self._move(BreakerState.CLOSED) if self._state is not BreakerState.CLOSED else None
        self._announce(transition)

    def record_failure(self) -> None:
        with self._lock:
            self._consecutive_failures += 1
            self._probe_in_flight = False
            transition = None
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._consecutive_failures >= self._policy.failure_threshold
            ):
                self._opened_at = self._clock()
                transition = self._move(BreakerState.OPEN)
        self._announce(transition)

    def reconnected(self) -> None:
        """The channel is connected again after being down: let the next call probe now.

        Without this, a server back after a long outage waited out the rest of the cool-down; a breaker
        opened on a connected channel (a server that answers too slowly) never hears this and keeps its
        cool-down.
        """
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return
            self._opened_at = self._clock() - self._policy.reset_timeout_s
        log.info("circuit open: the channel reconnected, the next call is the probe", extra={"breaker": self._name})

    def release(self) -> None:
        """A call admitted by before_call ended without saying anything about the service (e.g. cancelled)."""
        with self._lock:
            self._probe_in_flight = False

    def _move(self, new: BreakerState) -> tuple[BreakerState, BreakerState]:
        old, self._state = self._state, new
        return old, new

    def _announce(self, transition: tuple[BreakerState, BreakerState] | None) -> None:
        if transition is None:
            return
        old, new = transition
        level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
        log.log(level, "circuit %s -> %s", old.value, new.value, extra={"breaker": self._name})
        for listener in list(self._listeners):
            listener(old, new)
