"""Per-tenant request quotas: a token bucket per tenant, so one tenant cannot take a replica's whole capacity.

Each request costs one token (a batch one per item). A bucket holds at most
`burst` tokens and refills at `rate` tokens per second. Quotas are counted in
process: N replicas (or processes sharing a port) let a tenant through at up
to N times the rate.

The policy knows nothing of gRPC; the middleware decides what a request costs
and turns QuotaExceeded into RESOURCE_EXHAUSTED with a RetryInfo delay.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

from crypto_server.domain.errors import QuotaExceeded

DEFAULT_TENANT_RATE = 10_000.0
DEFAULT_TENANT_BURST = 20_000
# Tenants remembered at once (about 150 bytes each); the least recently seen is forgotten first.
# Forgetting one costs nothing it was owed: it comes back with a full bucket, which it would have
# refilled to anyway after `burst / rate` seconds of silence.
DEFAULT_MAX_TENANTS = 100_000
# Tenant ids the service accepts are at most this long; anything longer shares one bucket, so a
# caller cannot fill memory with huge keys (those requests are refused by the service anyway).
_MAX_TENANT_ID_CHARS = 64


class Quotas(Protocol):
    def charge(self, tenant_id: str, cost: int = 1) -> None:
        """Take `cost` tokens from the tenant's bucket, or raise QuotaExceeded saying how long to wait."""


class NoQuotas:
    """Quotas turned off (CRYPTO_TENANT_RATE=0): every request passes."""

    def charge(self, tenant_id: str, cost: int = 1) -> None:
        return None


class TenantQuotas:
    """A token bucket per tenant, bounded in memory (least recently used tenants forgotten).

    The hot path is one dict lookup, a move to the end of the LRU order and a
    little arithmetic, under one lock held for well under a microsecond.
    `monotonic` is injected so tests control time.
    """

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        max_tenants: int = DEFAULT_MAX_TENANTS,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_tenants < 1:
            raise ValueError("TenantQuotas needs rate > 0, burst >= 1 and max_tenants >= 1")
        self.rate = rate
        self.burst = burst
        self._max_tenants = max_tenants
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # tenant -> [tokens, when they were counted]
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def charge(self, tenant_id: str, cost: int = 1) -> None:
        key = tenant_id if len(tenant_id) <= _MAX_TENANT_ID_CHARS else ""
        # Configuration keeps the burst at least the largest batch; the cap only guards against a
        # request that could never pass, whatever it waited.
        cost = min(cost, self.burst)
        now = self._monotonic()
        with self._lock:
            bucket = self._buckets.get(key)
            if bucket is None:
                if len(self._buckets) >= self._max_tenants:
                    self._buckets.popitem(last=False)
                bucket = self._buckets[key] = [float(self.burst), now]
            else:
                self._buckets.move_to_end(key)
            tokens = min(float(self.burst), bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
            if tokens >= cost:
                bucket[0] = tokens - cost
                return
            bucket[0] = tokens
        raise QuotaExceeded(self.rate, (cost - tokens) / self.rate)

    def __len__(self) -> int:
        with self._lock:
            return len(self._buckets)


def quotas_for(rate: float, burst: int, monotonic: Callable[[], float] = time.monotonic) -> Quotas:
    """The quotas for the settings: off when `rate` is 0."""
    return TenantQuotas(rate, burst, monotonic=monotonic) if rate > 0 else NoQuotas()
