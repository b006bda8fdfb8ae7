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
  unused reservations of running servers (at most `flush_every` each). A server gives back the unused
  reservation of each version it has not used for a whole pass (every `flush_interval_s`), and all of them at
  a clean shutdown: once every server has stopped cleanly the stored counts are exact.

Giving back. The uses given back leave this server's memory before the store call and are never spent again,
whatever its outcome: a give-back that fails may still have landed (a timeout after the write, a connection
lost after the store received it, part of a batch), so using them again could take the stored count below the
true one. A give-back the store never received (refused by the circuit or the bulkhead: StoreCallRefused) is
sent again, with the same id, on the next pass and at shutdown. One whose outcome is unknown is not: whether it
landed cannot be told later for certain (the store remembers only a version's last GIVE_BACK_IDS_KEPT ids, and
a server cut off from the store for long could outlive them), so its uses stay counted as used, as a crashed
server's do: the stored count errs high by at most that give-back, never low. The id still makes the driver's
own re-send of the write harmless (`UsageCounters.give_back_encryptions` applies an id once per version). A
give-back holds at most GIVE_BACK_BATCH versions, so one slow pass leaves at most that many versions counted
high, and a pass with many idle versions is not one store call that times out every time.

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

import itertools
import logging
import secrets
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
# The most versions one give-back (one store call) holds.
GIVE_BACK_BATCH = 100


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
        # Give-backs not sent yet, or refused before they reached the store, by id (under the pass lock).
        self._unsent: dict[str, dict[VersionRef, int]] = {}
        # Give-back ids unique across servers and restarts: a random prefix per budget, then a sequence.
        self._give_back_prefix = secrets.token_hex(8)
        self._give_back_sequence = itertools.count(1)
        self._passes = Periodic(
            self.flush,
            flush_interval_s,
            name="usage-budget",
            skipped="unused encryption reservations not given back: the key store is unavailable (those it "
            "never received are sent on the next pass)",
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
        """The periodic pass: give back the unused reservations of the versions not used since the last pass
        (one store call), and forget them, so that memory holds only the versions in use and the stored counts
        come back to the true ones; repeat every give-back not confirmed yet. A refused version is asked about
        again. Raises StoreUnavailable (after trying every give-back) if any give-back was not confirmed."""
        with self._pass_lock:
            with self._lock:
                idle = [ref for ref, c in self._counters.items() if not c.used and not c.refilling]
                self._take_unused(idle)
                for counter in self._counters.values():
                    counter.used = False
                    counter.marked = False
            self._report()
            self._give_back()

    def unsent(self) -> dict[VersionRef, int]:
        """The uses this server has given back that the store has not received yet (refused by the circuit or
        the bulkhead), per version: never spent again, sent on the next pass."""
        with self._pass_lock:
            totals: dict[VersionRef, int] = {}
            for counts in self._unsent.values():
                for ref, count in counts.items():
                    totals[ref] = totals.get(ref, 0) + count
            return totals

    def _take_unused(self, refs: list[VersionRef]) -> None:
        """Drop the counters of `refs` (under both locks): their unused reservations become give-backs of at most
        GIVE_BACK_BATCH versions, each with an id of its own, sent by _give_back; never spent again."""
        returned: dict[VersionRef, int] = {}
        for ref in refs:
            counter = self._counters.pop(ref)
            if counter.reserved:
                returned[ref] = counter.reserved
        items = list(returned.items())
        for start in range(0, len(items), GIVE_BACK_BATCH):
            give_back_id = f"{self._give_back_prefix}-{next(self._give_back_sequence)}"
            self._unsent[give_back_id] = dict(items[start : start + GIVE_BACK_BATCH])

    def _give_back(self) -> None:
        """Send every give-back not sent yet (under the pass lock). One the store never received is kept for the
        next pass; one whose outcome is unknown is let go, its uses counted as used (see the module docstring).
        Raises the first failure once all were tried."""
        failure: Exception | None = None
        for give_back_id, counts in list(self._unsent.items()):
            try:
                self._store.give_back_encryptions(give_back_id, counts)
            except StoreCallRefused as error:
                failure = failure or error  # never reached the store: sent again on the next pass
                continue
            except Exception as error:  # anything else: it may have landed, so it is never sent again
                failure = failure or error
                log.warning(
                    "unused encryption reservations given back with an unknown outcome: they stay counted as used",
                    extra={"versions": len(counts), "uses": sum(counts.values())},
                )
            del self._unsent[give_back_id]
        if failure is not None:
            raise failure

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
                self._take_unused([ref for ref, c in self._counters.items() if not c.refilling])
            try:
                self._give_back()
            except Exception:  # shutdown goes on; the uses stay counted, never below the truth
                log.warning(
                    "unused encryption reservations not given back at shutdown (the key store is unavailable or "
                    "refused the write): they stay counted as used",
                    exc_info=True,
                )
