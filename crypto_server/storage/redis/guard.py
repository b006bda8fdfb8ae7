"""A Redis client that fails fast, and the guard that turns a Redis outage into cache misses."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

log = logging.getLogger(__name__)
DEFAULT_DB_INDEX = 2
_T = TypeVar("_T")


def connect(url: str, *, timeout_s: float) -> redis.Redis:
    """A client that fails fast: one attempt, short timeouts (DB index 2 unless the URL names one)."""
    path = urlparse(url).path.strip("/")
    extra: dict[str, Any] = {} if path else {"db": DEFAULT_DB_INDEX}
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=10,
        **extra,
    )


class RedisGuard:
    """Runs Redis calls so that an outage degrades instead of failing.

    After a failure, Redis is skipped for `backoff_s`; failures are logged at
    most once per `log_interval_s`, and the recovery once.
    """

    def __init__(
        self, *, backoff_s: float = 1.0, log_interval_s: float = 30.0, on_failure: Callable[[], None] | None = None
    ) -> None:
        self._on_failure = on_failure
        self._backoff_s = backoff_s
        self._log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self._last_logged = -float("inf")
        self._failing = False

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def call(self, operation: str, action: Callable[[], _T], fallback: _T) -> _T:
        if not self.available:
            return fallback
        try:
            result = action()
        except RedisError as error:
            self.failed(operation, error)
            return fallback
        self.succeeded()
        return result

    def failed(self, operation: str, error: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure()
        now = time.monotonic()
        with self._lock:
            self._skip_until = now + self._backoff_s
            self._failing = True
            if now - self._last_logged < self._log_interval_s:
                return
            self._last_logged = now
        log.warning(
            "redis unavailable; serving from the key store",
            extra={"operation": operation, "error": type(error).__name__, "detail": str(error)[:200]},
        )

    def succeeded(self) -> None:
        if self._failing:
            with self._lock:
                recovered, self._failing = self._failing, False
            if recovered:
                log.info("redis reachable again; caching resumed")
