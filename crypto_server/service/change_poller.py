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
from crypto_server.storage.port import ChangeFeed, KeyChange

log = logging.getLogger(__name__)

MAX_UNFINISHED = 100_000
# Drops a cached copy of a changed key elsewhere (Redis); False when that could not be done now.
CacheFix = Callable[[KeyChange], bool]


class ChangePoller:
    def __init__(
        self,
        store: ChangeFeed,
        keyring: Keyring,
        *,
        interval_s: float,
        margin_s: float,
        cache_fixes: Sequence[CacheFix] = (),
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._keyring = keyring
        self._interval_s = interval_s
        self._margin_s = margin_s
        self._cache_fixes = tuple(cache_fixes)
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
        try:
            changes = self._store.changed_keys(since)
        except StoreUnavailable as error:
            if not self._failing:
                self._failing = True
                log.warning("cannot read key changes from the store; retrying", extra={"detail": error.message})
            return
        if self._failing:
            self._failing = False
            log.info("reading key changes from the store again")
        caches_answer = True
        for change in [*self._unfinished.values(), *changes]:
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
