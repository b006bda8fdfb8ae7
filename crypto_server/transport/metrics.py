"""Prometheus metrics on CRYPTO_METRICS_PORT (off when unset). Bounded cardinality: no tenant or key labels.

| series | type | labels |
|---|---|---|
| caas_crypto_rpc_total | counter | method, code |
| caas_crypto_rpc_duration_seconds | histogram | method |
| caas_crypto_rpc_in_flight | gauge | |
| caas_crypto_keyring_lookups_total | counter | result (hit, miss) |
| caas_crypto_store_errors_total | counter | |
| caas_crypto_redis_errors_total | counter | |
| caas_crypto_key_integrity_failures_total | counter | |
| caas_crypto_keys | gauge | key_type, state |
| caas_crypto_tenants | gauge | |
| caas_crypto_root_key_available | gauge | role (root, other) |
| caas_crypto_root_key_operation_seconds | summary (count, sum) | role |
| caas_crypto_root_key_errors_total | counter | role |
| caas_crypto_build_info | gauge (always 1) | version, python |
| process_* (cpu, memory, open fds, start time), python_info | prometheus-client's standard collectors | |

The root key series count wraps and unwraps under the root key (a master key's first use after a start or a
keyring expiry, a new master key, the health probe): never the hot path. With an HSM their latency is the
HSM's; an error is a call the HSM could not serve (not a ciphertext that failed to authenticate).
"""

from __future__ import annotations

import contextlib
import logging
import platform
import threading
import time
from collections.abc import Callable, Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.metrics_core import Metric

from crypto_server import __version__
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import CryptoServiceError, StoreUnavailable
from crypto_server.root_key import RootKey
from crypto_server.service.keyring import Keyring
from crypto_server.storage.port import KeyCounts, StoreStats

log = logging.getLogger(__name__)
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_KEY_COUNT_MAX_AGE_S = 30.0


class RpcObserver(Protocol):
    def finished(self, method: str, code: str, seconds: float) -> None: ...

    def failed(self, error: CryptoServiceError) -> None: ...


class NullRpcObserver:
    """Metrics off: nothing to record."""

    def finished(self, method: str, code: str, seconds: float) -> None:
        return None

    def failed(self, error: CryptoServiceError) -> None:
        return None


class _StateCollector:
    """Series read at scrape time: keyring lookups, and key counts (from the store, at most every 30 s)."""

    def __init__(self, keyring: Keyring, store: StoreStats, clock: Clock) -> None:
        self._keyring = keyring
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: KeyCounts | None = None
        self._counted_at = -float("inf")

    def _key_counts(self) -> KeyCounts | None:
        with self._lock:
            if time.monotonic() - self._counted_at >= _KEY_COUNT_MAX_AGE_S:
                # On a store error keep the last counts; the errors show in their own series.
                with contextlib.suppress(StoreUnavailable):
                    self._counts = self._store.key_counts(self._clock.now())
                self._counted_at = time.monotonic()
            return self._counts

    def collect(self) -> Iterator[Metric]:
        lookups = CounterMetricFamily(
            "caas_crypto_keyring_lookups",
            "Key lookups answered from memory (hit) or the store (miss)",
            labels=["result"],
        )
        lookups.add_metric(["hit"], self._keyring.hits)
        lookups.add_metric(["miss"], self._keyring.misses)
        yield lookups
        counts = self._key_counts()
        if counts is not None:
            keys = GaugeMetricFamily(
                "caas_crypto_keys", "Keys by type and effective state", labels=["key_type", "state"]
            )
            for (key_type, state), number in sorted(counts.by_type_and_state.items(), key=lambda i: str(i[0])):
                keys.add_metric([key_type.value, state.value], number)
            yield keys
            yield GaugeMetricFamily("caas_crypto_tenants", "Tenants with at least one key", value=counts.tenants)


class _RootKeyCollector:
    """The root keys' own counters, read at scrape time."""

    def __init__(self, keys: dict[str, RootKey]) -> None:
        self._keys = keys

    def collect(self) -> Iterator[Metric]:
        available = GaugeMetricFamily(
            "caas_crypto_root_key_available", "Whether the root key can be used (its HSM answers)", labels=["role"]
        )
        latency = SummaryMetricFamily(
            "caas_crypto_root_key_operation_seconds", "Wraps and unwraps under the root key", labels=["role"]
        )
        errors = CounterMetricFamily(
            "caas_crypto_root_key_errors", "Root key operations that failed (the HSM could not serve)", labels=["role"]
        )
        for role, key in self._keys.items():
            stats = key.stats()
            available.add_metric([role], 1 if stats.available else 0)
            latency.add_metric([role], count_value=stats.operations, sum_value=stats.seconds)
            errors.add_metric([role], stats.errors)
        yield available
        yield latency
        yield errors


class Metrics:
    def __init__(self, in_flight: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        # The standard series every Prometheus dashboard expects (the default registry has them; ours is
        # separate so that tests and several servers in one process do not collide).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        build = Gauge(
            "caas_crypto_build_info",
            "The running build: always 1, the version in the labels",
            ["version", "python"],
            registry=self.registry,
        )
        build.labels(__version__, platform.python_version()).set(1)
        self._calls = Counter(
            "caas_crypto_rpc", "RPCs by method and status code", ["method", "code"], registry=self.registry
        )
        self._latency = Histogram(
            "caas_crypto_rpc_duration_seconds",
            "RPC latency by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        in_flight_gauge = Gauge("caas_crypto_rpc_in_flight", "RPCs being served", registry=self.registry)
        # No tenant or key label: one series, the version closest to refusing (its key is in the store).
        self.key_version_budget_used = Gauge(
            "caas_crypto_key_version_budget_used_ratio",
            "The highest fraction of its encryption budget (the hard limit) any key version this server has "
            "used has spent or reserved, as of this server's last reservation",
            registry=self.registry,
        )
        in_flight_gauge.set_function(in_flight)
        self._store_errors = Counter(
            "caas_crypto_store_errors",
            "Calls that failed because the key store was unavailable",
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "caas_crypto_redis_errors",
            "Redis calls that failed (the service went on without Redis)",
            registry=self.registry,
        )
        self.integrity_failures = Counter(
            "caas_crypto_key_integrity_failures",
            "Keys refused because their stored metadata failed its integrity check",
            registry=self.registry,
        )
        self.audit_dropped = Counter(
            "caas_crypto_audit_records_dropped",
            "Queued audit records (crypto operations, denials) dropped: the queue was full or the sink failed",
            registry=self.registry,
        )
        self._server: object | None = None

    def finished(self, method: str, code: str, seconds: float) -> None:
        self._calls.labels(method, code).inc()
        self._latency.labels(method).observe(seconds)

    def failed(self, error: CryptoServiceError) -> None:
        if isinstance(error, StoreUnavailable):
            self._store_errors.inc()

    def watch_state(self, keyring: Keyring, store: StoreStats, clock: Clock) -> None:
        self.registry.register(_StateCollector(keyring, store, clock))

    def watch_root_keys(self, root: RootKey, other: RootKey | None) -> None:
        keys = {"root": root} if other is None else {"root": root, "other": other}
        self.registry.register(_RootKeyCollector(keys))

    def serve(self, host: str, port: int) -> int:
        """Expose /metrics over HTTP; the port it listens on."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._server = server
        bound: int = server.server_address[1]
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()  # type: ignore[attr-defined]
            self._server.server_close()  # type: ignore[attr-defined]
            self._server = None
