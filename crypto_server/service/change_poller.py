"""Learning of key changes made elsewhere, from the store itself, on a short interval.

Redis pub/sub tells every server of a change at once, but a message published
while a subscriber is reconnecting, or while Redis is frozen, is gone. The
store is the truth: every write records when it happened (`changed_at`), and
each server asks it every `interval_s` for the keys written recently. A key
held in memory at an older revision is dropped, a tenant whose master key
changed is dropped entirely, and a Redis entry older than the store's is
deleted (retried until Redis answers). So a change made on one server is in
effect on every server within about one interval, whatever Redis does.

The window asked for reaches `margin_s` before the previous poll: a write that
was slow to land (up to the store timeout) or stamped by a replica whose clock
is a little behind is still seen. A change is handled once per revision.

A cache that loses writes. Redis can come back with older data than it
acknowledged — restarted from a snapshot or an AOF that trails it, a failover
to a lagging replica, a restore — and then serves older states of keys, at
their old revisions and with their full TTL; the changes it lost may be long
out of the window, and handled. So every copy a cache served is checked too:
on each poll the poller takes the copies served since the previous one (the
cache notes each, `take_served_copies`) and reads the store's revision of
those keys (`latest_changes`, by primary key, a few hundred per read). A copy
older than the store is handled like a change that had just been made: dropped
from memory and from the cache (retried until the cache answers). So a copy
from a cache that lost writes is used for at most one interval plus a store
round trip after it was read, by any server, however long ago the change was
and whether or not the server was running then.

Why this rather than detecting the rewind (a generation marker in Redis
compared with one a server remembers or the store records): a marker a server
remembers tells nothing to a server started after the rewind; a counter that
the store records costs store writes, and writes made after the rewind can
bring Redis's count back above it before anyone looks; a token or Redis's
run id misses a rewind without a restart (a node resynchronised from a lagging
one). Checking what is served needs no marker, no flush and no agreement
between servers, catches every way of losing writes (an operator's edit too),
and costs one small read per poll, and none while nothing was read from the
cache. The hot path (a key held in memory) never meets it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from crypto_server.domain.errors import StoreUnavailable
from crypto_server.domain.keys import KeyType
from crypto_server.service.keyring import Keyring
from crypto_server.storage.port import CachedCopy, ChangeFeed, KeyChange

log = logging.getLogger(__name__)

MAX_UNFINISHED = 100_000
# Drops a cached copy of a changed key elsewhere (Redis); False when that could not be done now.
CacheFix = Callable[[KeyChange], bool]
# The copies a cache (Redis) served since it was last asked: each is checked against the store.
ServedCopies = Callable[[], Sequence[CachedCopy]]
# A cache that lost writes is named in the log at most this often (it serves many older copies in a burst).
_LOST_WRITES_LOG_INTERVAL_S = 30.0


class ChangePoller:
    def __init__(
        self,
        store: ChangeFeed,
        keyring: Keyring,
        *,
        interval_s: float,
        margin_s: float,
        cache_fixes: Sequence[CacheFix] = (),
        served_copies: Sequence[ServedCopies] = (),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._interval_s = interval_s
        self._margin_s = margin_s
        self._cache_fixes = tuple(cache_fixes)
        self._served_copies = tuple(served_copies)
        # Copies served by a cache, not yet checked against the store (it was unreachable), per key: the lowest
        # revision served.
        self._unchecked: dict[tuple[str, str], CachedCopy] = {}
        self._lost_writes_logged = -float("inf")
        self._wall_clock = wall_clock
        # (key id, revision) handled, with when it was first seen; pruned once out of the window.
        self._handled: dict[tuple[str, int], float] = {}
        # Changes whose cached copies could not all be dropped yet (Redis unreachable), by key: retried on
        # every poll until done, even once they are out of the window.
        self._unfinished: dict[str, KeyChange] = {}
        self._previous_poll = wall_clock()
        self._failing = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="change-poller", daemon=True)
        self.polls = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 10)

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self.poll_once()

    def poll_once(self) -> None:
        """Ask the store for recent changes and apply them; a store outage just widens the next window."""
        started = self._wall_clock()
        since = datetime.fromtimestamp(self._previous_poll - self._margin_s, UTC)
        # Before the store is read: each copy is checked against a state of the store at least as new as it.
        self._take_served_copies()
        try:
            changes = self._store.changed_keys(since)
            stale = self._stale_copies(changes)
        except StoreUnavailable as error:
            if not self._failing:
                self._failing = True
                log.warning("cannot read key changes from the store; retrying", extra={"detail": error.message})
            if len(self._unchecked) > MAX_UNFINISHED:
                # A long store outage with very many keys read from the cache: memory starts afresh.
                log.warning("too many cached copies could not be checked; dropping every key held in memory")
                self._unchecked.clear()
                self._keyring.forget_all()
            return
        if self._failing:
            self._failing = False
            log.info("reading key changes from the store again")
        caches_answer = True
        for change in [*self._unfinished.values(), *changes, *stale]:
            if (change.key_id, change.revision) in self._handled:
                continue
            # Once a cache has failed this poll, the rest wait for the next one: a frozen Redis costs its
            # timeout once per poll, not once per change (which would delay every change behind it).
            fixed = caches_answer and all(fix(change) for fix in self._cache_fixes)
            caches_answer = caches_answer and fixed
            self._forget(change)
            if fixed:
                self._handled[(change.key_id, change.revision)] = started
                self._unfinished.pop(change.key_id, None)
            else:
                known = self._unfinished.get(change.key_id)
                if known is None or known.revision < change.revision:
                    self._unfinished[change.key_id] = change
        if len(self._unfinished) > MAX_UNFINISHED:
            # A long cache outage with very many changes: stop tracking them one by one. The cache entries
            # age out with their TTL; memory starts afresh.
            log.warning("too many key changes could not reach the cache; dropping every key held in memory")
            self._unfinished.clear()
            self._keyring.forget_all()
        self._previous_poll = started
        horizon = started - 2 * (self._margin_s + self._interval_s)
        for handled in [item for item, seen in self._handled.items() if seen < horizon]:
            del self._handled[handled]
        self.polls += 1

    def _take_served_copies(self) -> None:
        for take in self._served_copies:
            for copy in take():
                slot = (copy.tenant_id, copy.key_id)
                noted = self._unchecked.get(slot)
                if noted is None or copy.revision < noted.revision:
                    self._unchecked[slot] = copy

    def _stale_copies(self, changes: Sequence[KeyChange]) -> list[KeyChange]:
        """The store's latest change of each key a cache served an older copy of (for a key the store does not
        hold, one that outdates the copy): to be handled like a change just made, even one handled before (the
        cache lost what that did). Raises StoreUnavailable, the copies kept for the next poll."""
        if not self._unchecked:
            return []
        copies = list(self._unchecked.values())
        latest = {
            (change.tenant_id, change.key_id): change
            for change in self._store.latest_changes([(copy.tenant_id, copy.key_id) for copy in copies])
        }
        self._unchecked.clear()
        stale: list[KeyChange] = []
        for copy in copies:
            current = latest.get((copy.tenant_id, copy.key_id))
            if current is None:
                # Nothing in the store vouches for the copy.
                now = datetime.fromtimestamp(self._wall_clock(), UTC)
                current = KeyChange(copy.tenant_id, copy.key_id, copy.key_type, copy.revision + 1, now)
            if current.revision > copy.revision:
                self._handled.pop((current.key_id, current.revision), None)
                stale.append(current)
        recent = {(change.key_id, change.revision) for change in changes}
        lost = [change for change in stale if (change.key_id, change.revision) not in recent]
        logged = time.monotonic()
        if lost and logged - self._lost_writes_logged >= _LOST_WRITES_LOG_INTERVAL_S:
            # A copy older than a change the window no longer shows: the cache lost writes (a read racing a recent
            # change is ordinary and not logged).
            self._lost_writes_logged = logged
            log.warning(
                "the cache served keys older than the store: it lost writes (restarted from an older snapshot, "
                "failed over or restored); dropping its older copies as they are read",
                extra={"keys": len(lost)},
            )
        return stale

    def _forget(self, change: KeyChange) -> None:
        """Drop the copy held in memory if it is older than `change`. After the caches: a load between the two
        would otherwise put the old state back in memory (a cache that could not be fixed is not read)."""
        if change.key_type is KeyType.MASTER:
            self._keyring.forget_tenant_unless_current(change.tenant_id, change.key_id, change.revision)
        else:
            self._keyring.forget_unless_current(change.tenant_id, change.key_id, change.revision)


def change_margin(store_timeout_s: float) -> timedelta:
    """How far before the previous poll to look: a write may take up to the store timeout to land, and
    replicas' clocks may differ by a little."""
    return timedelta(seconds=store_timeout_s + 2.0)
