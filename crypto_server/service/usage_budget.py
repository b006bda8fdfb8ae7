"""A usage budget per key version: AES-GCM with random 96-bit nonces must stay under 2^32 encryptions per key
(NIST SP 800-38D, 8.3), however many replicas encrypt with it.

Reservations. A server encrypts with a version only with a use it has reserved. When it holds none it reserves a
block of `flush_every` with one atomic store step (`UsageCounters.reserve_encryptions`): the store adds
min(block, hard_limit - stored) to the version's stored count and says how much that was. The rest of the block
is spent from memory, one decrement under a lock per encryption. So the stored count is every server's used
encryptions plus their unused reservations, and since no reservation takes it past the hard limit:

- the bound is exact: a version never makes more than `hard_limit` encryptions, however many replicas encrypt
  with it, crashes included (a crashed server's unused reservation stays counted: it is never used);
- the stored count (`KeyVersion.encryptions`) is never below the true count, and above it by at most the
  unused reservations of running servers (at most `flush_every` each). A server gives back, with an atomic
  decrement, the unused reservation of each version it has not used for a whole pass (every
  `flush_interval_s`), and all of them at a clean shutdown: once every server has stopped cleanly the stored
  counts are exact (unless a give-back's outcome was unknown: those uses stay counted, see `_give_back`).

- Soft limit: a reservation that takes the stored count to or over it marks the key due for rotation
  (`UsageCounters.mark_rotation_due`: a no-op unless the version is still primary); the rotator rotates it
  whatever its rotation period. The count it crosses includes reserved uses, so a key rotates when its servers
  have used or reserved `soft_limit` encryptions.
- Hard limit: a version whose reservation is granted nothing refuses to encrypt (KeyVersionExhausted), from
  memory until the next pass, when this server asks the store again (others may have given unused uses back).

Counts are not covered by the key's integrity tag (domain/key_integrity.py): they change on every reservation
from every replica, and authenticating them would turn each one into a compare-and-swap of the whole key. What
altering a stored count can do is bounded: a higher count rotates the key early or refuses encryption early
(a new primary is a RotateKey away); a lower count lets the version go past the hard limit by at most what
was subtracted. Whoever can write the store can already disable or delete keys.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import (
    CryptoServiceError,
    KeyNotFound,
    KeyVersionExhausted,
    StoreCallRefused,
    StoreUnavailable,
)
from crypto_server.domain.limits import GCM_RANDOM_NONCE_LIMIT
from crypto_server.service.periodic import Periodic
from crypto_server.storage.port import Reservation, UsageCounters, VersionRef

log = logging.getLogger(__name__)

DEFAULT_FLUSH_EVERY = 4096
DEFAULT_FLUSH_INTERVAL_S = 5.0
DEFAULT_SOFT_LIMIT = 2**30
# Exact: reservations never let a version pass it, so it needs no margin for replicas or crashes.
DEFAULT_HARD_LIMIT = GCM_RANDOM_NONCE_LIMIT


@dataclass(slots=True)
class _Counter:
    """One version's budget on this server."""

    reserved: int = 0  # uses reserved in the store and not used yet
    total: int = 0  # the stored count at this server's last reservation: every server's used and reserved uses
    used: bool = True  # encrypted with (or reserved for) since the last pass; a version idle for a pass is dropped
    refused: bool = False  # granted nothing: refused from memory until the next pass drops this counter
    refilling: bool = False  # a reservation is under way: the pass leaves this counter alone
    marked: bool = False  # marked due for rotation (soft limit) since the last pass
    # One reservation at a time per version: the others wait for it instead of reserving blocks of their own.
    refill: threading.Lock = field(default_factory=threading.Lock)


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
        self._block = flush_every
        self._on_fraction = on_fraction
        self._counters: dict[VersionRef, _Counter] = {}
        self._lock = threading.Lock()
        self._pass_lock = threading.Lock()
        self._passes = Periodic(
            self.flush,
            flush_interval_s,
            name="usage-budget",
            skipped="unused encryption reservations not given back: the key store is unavailable; retried on "
            "the next pass",
        )
        self.highest_fraction = 0.0

    def record(self, version: VersionRef) -> None:
        """Count one encryption with `version`, or raise KeyVersionExhausted. Spends a reserved use (memory
        only); with none left, first reserves a block (one store round trip): StoreUnavailable if that fails,
        KeyNotFound if the version is no longer stored."""
        while True:
            with self._lock:
                counter = self._counters.get(version)
                if counter is None:
                    counter = self._counters[version] = _Counter()
                if counter.reserved:
                    counter.reserved -= 1
                    counter.used = True
                    return
                if counter.refused:
                    raise KeyVersionExhausted(version.key_id, version.version)
            self._reserve(version, counter)

    def record_many(self, version: VersionRef, count: int) -> tuple[int, CryptoServiceError | None]:
        """Count up to `count` encryptions with `version` (a batch's items that use it): how many were counted,
        which is `count` unless the hard limit (or a failed reservation) stops it partway, and then the error
        each remaining encryption gets. Reserved uses are taken in one step under the lock; blocks are
        reserved as `record` reserves them, so the bound stays exact. Raises as `record` does only when it
        counted none."""
        taken = 0
        while True:
            with self._lock:
                counter = self._counters.get(version)
                if counter is None:
                    counter = self._counters[version] = _Counter()
                if counter.reserved:
                    spent = min(counter.reserved, count - taken)
                    counter.reserved -= spent
                    counter.used = True
                    taken += spent
                    if taken == count:
                        return taken, None
                if counter.refused:
                    exhausted = KeyVersionExhausted(version.key_id, version.version)
                    if taken:
                        return taken, exhausted
                    raise exhausted
            try:
                self._reserve(version, counter)
            except CryptoServiceError as error:
                if not taken:
                    raise
                return taken, error

    def held(self) -> dict[VersionRef, int]:
        """The versions this server keeps a counter for, with the uses it has reserved and not used yet."""
        with self._lock:
            return {ref: counter.reserved for ref, counter in self._counters.items()}

    def _reserve(self, version: VersionRef, counter: _Counter) -> None:
        with counter.refill:
            with self._lock:
                if counter.reserved or counter.refused or self._counters.get(version) is not counter:
                    return  # another caller reserved (or was refused) meanwhile, or the pass dropped it: look again
                counter.refilling = True
                block = self._block
            try:
                reservation = self._store.reserve_encryptions(version, block, self.hard_limit)
            except BaseException:
                with self._lock:
                    counter.refilling = False
                raise
            # Under the same lock as `refilling` is cleared: the pass cannot drop the counter in between and
            # orphan what was just reserved.
            with self._lock:
                counter.refilling = False
                if reservation is None:
                    self._counters.pop(version, None)
                    raise KeyNotFound(version.key_id)
                counter.reserved += reservation.granted
                counter.total = max(counter.total, reservation.total)
                counter.used = bool(reservation.granted)  # a refused counter is dropped by the next pass
                counter.refused = not reservation.granted
        self._report()
        self._mark_if_over_soft_limit(version, reservation, counter)

    def _mark_if_over_soft_limit(self, version: VersionRef, reservation: Reservation, counter: _Counter) -> None:
        if reservation.total < self.soft_limit or counter.marked:
            return
        try:
            # Repeated once per pass until the key rotates (a no-op once `version` is not its primary): each mark
            # is a store write and drops the key's Redis copy, so not on every reservation.
            self._store.mark_rotation_due(version, self._clock.now())
        except StoreUnavailable:
            log.warning("a key at its usage soft limit not marked for rotation: the key store is unavailable")
        else:
            counter.marked = True

    def _report(self) -> None:
        """Publish the highest fraction of the hard limit a version this server knows has reached (the budget
        gauge), computed and published under the lock: a pass and a reservation cannot publish out of order."""
        with self._lock:
            highest = max((c.total for c in self._counters.values()), default=0)
            self.highest_fraction = highest / self.hard_limit
            if self._on_fraction is not None:
                self._on_fraction(self.highest_fraction)

    def flush(self) -> None:
        """The periodic pass: give back (an atomic decrement per version, in one store call) the unused
        reservations of the versions not used since the last pass, and forget them, so that memory holds only
        the versions in use and the stored counts come back to the true ones. A refused version is asked about
        again."""
        with self._pass_lock:
            with self._lock:
                idle = [ref for ref, c in self._counters.items() if not c.used and not c.refilling]
                returned = self._take_unused(idle)
                for counter in self._counters.values():
                    counter.used = False
                    counter.marked = False
            self._report()
            self._give_back(returned)

    def _take_unused(self, refs: list[VersionRef]) -> dict[VersionRef, int]:
        """Drop the counters of `refs` (under the lock); their unused reservations, negated for the store."""
        returned: dict[VersionRef, int] = {}
        for ref in refs:
            counter = self._counters.pop(ref)
            if counter.reserved:
                returned[ref] = -counter.reserved
        return returned

    def _give_back(self, returned: dict[VersionRef, int]) -> None:
        """Give back each version's unused uses, one atomic decrement (one store call) per version.

        A give-back refused before it reached the store (StoreCallRefused), and those not tried after a failure,
        leave the uses this server's: still reserved in the store, to use or give back on the next pass. One that
        failed otherwise may have been applied all the same (a decrement that timed out, or whose connection
        dropped, after the store received it: a database fail-over does exactly that), so its uses are neither
        used nor given back again: they stay counted, as a crashed server's do — the count errs high (a version
        refuses early, never late). Keeping them let the store's count fall below the uses made: the decrement
        applied twice. Raises the failure once the rest are back in memory."""
        unsettled = dict(returned)
        try:
            for ref, negated in returned.items():
                try:
                    self._store.add_encryptions({ref: negated})
                except StoreCallRefused:
                    raise
                except StoreUnavailable:
                    del unsettled[ref]
                    log.warning(
                        "unused encryption reservations of a key version not given back, and not used again: the "
                        "store may have applied the give-back; they stay counted as used",
                        extra={"key_id": ref.key_id, "key_version": ref.version, "uses": -negated},
                    )
                    raise
                del unsettled[ref]
        except StoreUnavailable:
            with self._lock:
                for ref, negated in unsettled.items():
                    self._counters.setdefault(ref, _Counter(used=False)).reserved -= negated
            raise

    # -- the background thread ---------------------------------------------------

    def start(self) -> None:
        self._passes.start()

    def stop(self) -> None:
        """Stop the thread and give every unused reservation back (after the last call, before the store
        closes). A call still running afterwards reserves one use at a time: nothing is left reserved."""
        if not self._passes.stop():
            return
        with self._pass_lock:
            with self._lock:
                self._block = 1
                returned = self._take_unused([ref for ref, c in self._counters.items() if not c.refilling])
            try:
                self._give_back(returned)
            except StoreUnavailable:
                log.warning(
                    "unused encryption reservations not given back at shutdown: the key store is unavailable; "
                    "they stay counted as used"
                )
