"""Counters a service can export (e.g. to Prometheus): calls, attempts, retries, failures, breaker state."""

from __future__ import annotations

import threading
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ClientStats:
    calls: int
    attempts: int
    retries: int
    failures: int
    rejected_by_breaker: int
    breaker_state: str
    breaker_transitions: int
    cache_hits: int


class ClientMetrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(
            ("calls", "attempts", "retries", "failures", "rejected_by_breaker", "breaker_transitions", "cache_hits"),
            0,
        )

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[name] += amount

    def snapshot(self, breaker_state: str) -> ClientStats:
        with self._lock:
            return ClientStats(breaker_state=breaker_state, **self._counts)
