"""A usage budget per key version: AES-GCM with random 96-bit nonces must stay under 2^32 encryptions per key
(NIST SP 800-38D, 8.3), however many replicas encrypt with it.

Counting is an in-memory increment on the hot path. Each server flushes its counts to the store as atomic
increments (`KeyStore.add_encryptions`) every `flush_every` encryptions of one version (the encrypting call
that would pass it flushes first) and every `flush_interval_s` seconds, and at shutdown; the store answers
with the new totals, which include every replica's flushed counts.

- Soft limit: a flush that leaves a primary version at or over it marks the key due for rotation
  (`KeyStore.mark_rotation_due`); the rotator rotates it whatever its rotation period.
- Hard limit: a version refuses to encrypt (KeyVersionExhausted) once the total this server knows plus its
  unflushed count reaches it.

The bound: every server encrypts at most `flush_every` times with a version between two of its flushes, and
each flush tells it the total of all flushed counts. Once a flush has seen the total at or over the hard
limit, that server refuses; so with R servers a version makes at most `hard_limit - 1 + R * flush_every`
encryptions, plus up to `flush_every` per crash (a crash loses its unflushed count). The default hard limit
leaves room for 256 servers and crashes together (docs/storage.md).

Counts are not covered by the key's integrity tag (domain/key_integrity.py): they change on every flush from
every replica, and authenticating them would turn each flush into a compare-and-swap of the whole key. What
altering a stored count can do is bounded: a higher count rotates the key early or refuses encryption early
(a new primary is a RotateKey away); a lower count lets the version go past the hard limit by at most what
was subtracted. Whoever can write the store can already disable or delete keys.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import KeyVersionExhausted, StoreUnavailable
from crypto_server.domain.limits import GCM_RANDOM_NONCE_LIMIT
from crypto_server.service.periodic import Periodic
from crypto_server.storage.port import UsageCounters, VersionRef

log = logging.getLogger(__name__)

DEFAULT_FLUSH_EVERY = 4096
DEFAULT_FLUSH_INTERVAL_S = 5.0
DEFAULT_SOFT_LIMIT = 2**30
# Room for 256 servers (or servers plus crashes) with DEFAULT_FLUSH_EVERY unflushed each.
DEFAULT_HARD_LIMIT = GCM_RANDOM_NONCE_LIMIT - 256 * DEFAULT_FLUSH_EVERY


@dataclass(slots=True)
class _Counter:
    known: int = 0  # the total in the store at this server's last flush (or load), every replica's counts
    pending: int = 0  # this server's encryptions not yet flushed


class UsageBudget:
    def __init__(
        self,
        store: UsageCounters,
        clock: Clock,
        *,
        soft_limit: int = DEFAULT_SOFT_LIMIT,
        hard_limit: int = DEFAULT_HARD_LIMIT,
        flush_every: int = DEFAULT_FLUSH_EVERY,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        on_fraction: Callable[[float], None] | None = None,
    ) -> None:
        if not 1 <= soft_limit <= hard_limit <= GCM_RANDOM_NONCE_LIMIT or flush_every < 1:
            raise ValueError("need 1 <= soft_limit <= hard_limit <= 2^32 and flush_every >= 1")
        self._store = store
        self._clock = clock
        self.soft_limit = soft_limit
        self.hard_limit = hard_limit
        self._flush_every = flush_every
        self._flush_interval_s = flush_interval_s
        self._on_fraction = on_fraction
        self._counters: dict[VersionRef, _Counter] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._flushes = Periodic(
            self.flush,
            self._flush_interval_s,
            name="usage-budget",
            skipped="usage counts not flushed: the key store is unavailable; retried on the next flush",
        )
        self.highest_fraction = 0.0

    def record(self, version: VersionRef, stored_count: int) -> None:
        """Count one encryption with `version` (whose loaded copy says `stored_count`), or raise
        KeyVersionExhausted. Flushes first (one store round trip) when this server's unflushed count for the
        version is at `flush_every`; StoreUnavailable if that flush fails."""
        while True:
            with self._lock:
                counter = self._counters.get(version)
                if counter is None:
                    counter = self._counters[version] = _Counter()
                counter.known = max(counter.known, stored_count)
                if counter.known + counter.pending >= self.hard_limit:
                    raise KeyVersionExhausted(version.key_id, version.version)
                if counter.pending < self._flush_every:
                    counter.pending += 1
                    return
            self.flush()

    def flush(self) -> None:
        """Add every unflushed count to the store (atomic increments), learn the totals, and mark for rotation
        the keys whose primary is at or over the soft limit. Counts stay pending if the store fails."""
        with self._flush_lock:
            with self._lock:
                batch = {ref: counter.pending for ref, counter in self._counters.items() if counter.pending}
            if not batch:
                return
            totals = self._store.add_encryptions(batch)
            with self._lock:
                for ref, count in batch.items():
                    counter = self._counters[ref]
                    counter.pending -= count
                    counter.known = max(counter.known, totals.get(ref, 0))
                highest = max((c.known for c in self._counters.values()), default=0)
            self.highest_fraction = highest / self.hard_limit
            if self._on_fraction is not None:
                self._on_fraction(self.highest_fraction)
            now = self._clock.now()
            for ref, total in totals.items():
                if total >= self.soft_limit:
                    # A no-op unless `ref` is still the key's primary: repeated by every flush until it rotates.
                    self._store.mark_rotation_due(ref, now)

    # -- the background thread ---------------------------------------------------

    def start(self) -> None:
        self._flushes.start()

    def stop(self) -> None:
        """Stop the thread and flush what is left (after the last call, before the store closes)."""
        if not self._flushes.stop():
            return
        try:
            self.flush()
        except StoreUnavailable:
            log.warning("usage counts lost at shutdown: the key store is unavailable")
