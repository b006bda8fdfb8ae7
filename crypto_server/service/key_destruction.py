"""Disabling versions, scheduling and cancelling destruction, and carrying a due destruction out.

The rules are the domain's (domain/key_destruction.py); this module loads a
key, applies one, stores the result with a compare-and-set on the key's
revision (reloading when another writer was first) and invalidates every
server's copy. Destruction itself (`destroy_due`) is run by the periodic pass
(service/key_destroyer.py), one server at a time.

A tenant is destroyed through its master key: scheduling it schedules every
master version; when it runs, every other key of the tenant is destroyed first
(defence in depth: the master key alone already makes them unrecoverable), then
the master key, so a pass that stops part-way leaves the master due and the next
pass finishes. Every server's keyring then forgets the tenant.

Every decision here reads the store directly (`fresh`: the integrity check
without the Redis cache), never a cached copy that may trail it; writes go
through the cache, which then holds the new state. A tenant's cancellation
races its destruction: it is refused once the destruction time has come, and
the pass re-reads the master key before each key it destroys and before the
master itself, stopping if the tenant is no longer due (a canceller whose clock
trails the pass's). One key of the tenant that fails its integrity check is
skipped (logged, counted as an integrity failure), never a reason to leave the
master key, the point of shredding, in place.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import (
    ConcurrentModification,
    KeyIntegrityError,
    KeyNotFound,
    KeyTypeMismatch,
    KeyVersionStateConflict,
    TenantDestroyed,
    TenantNotFound,
)
from crypto_server.domain.key_destruction import (
    destruction_time,
    due_versions,
    with_destruction_cancelled,
    with_key_destruction_scheduled,
    with_version_destruction_scheduled,
    with_version_disabled,
    with_versions_destroyed,
)
from crypto_server.domain.keys import Key, KeyType, parse_key_id, validate_tenant_id
from crypto_server.service.key_versions import with_every_version, with_version
from crypto_server.storage.port import Invalidation, KeyQuery, KeyReader, KeyServing, ListCursor

log = logging.getLogger(__name__)

# Each failed attempt means another writer changed the key; the bound only stops a pathological storm.
MAX_ATTEMPTS = 100
# Keys read per page while destroying a tenant.
TENANT_PAGE = 200


class KeyDestruction:
    def __init__(
        self,
        store: KeyServing,
        clock: Clock,
        invalidation: Invalidation,
        *,
        fresh: KeyReader | None = None,
        listing: KeyReader | None = None,
    ) -> None:
        """`store`: key records as the service writes them (through the Redis cache, if any, and the integrity
        check). `fresh`: the same records read from the store itself, still integrity-checked (defaults to
        `store`). `listing`: the store unchecked, used only to page through a tenant's key ids while destroying
        it, each key then read and checked through `fresh` (defaults to `fresh`)."""
        self._store = store
        self._fresh = fresh or store
        self._listing = listing or self._fresh
        self._clock = clock
        self._invalidation = invalidation

    # -- versions and keys ----------------------------------------------------------

    def disable_version(self, tenant_id: str, key_id: str, version: int) -> Key:
        return self._change(tenant_id, key_id, lambda key: with_version_disabled(key, version, True), version)

    def enable_version(self, tenant_id: str, key_id: str, version: int) -> Key:
        return self._change(tenant_id, key_id, lambda key: with_version_disabled(key, version, False), version)

    def schedule_version_destruction(
        self, tenant_id: str, key_id: str, version: int, waiting_period: timedelta | None = None
    ) -> Key:
        destroy_at = destruction_time(self._clock.now(), waiting_period)
        return self._change(
            tenant_id, key_id, lambda key: with_version_destruction_scheduled(key, version, destroy_at), version
        )

    def schedule_key_destruction(self, tenant_id: str, key_id: str, waiting_period: timedelta | None = None) -> Key:
        destroy_at = destruction_time(self._clock.now(), waiting_period)
        return self._change(
            tenant_id, key_id, lambda key: with_key_destruction_scheduled(key, destroy_at), EVERY_VERSION
        )

    def cancel_key_destruction(self, tenant_id: str, key_id: str, version: int = 0) -> Key:
        """Cancel the destruction of `version` (0: of every scheduled version, all of which the key holds) before
        it runs."""
        return self._change(tenant_id, key_id, lambda key: with_destruction_cancelled(key, version), version)

    def _change(self, tenant_id: str, key_id: str, transform: Callable[[Key], Key], version: int) -> Key:
        """Apply `transform` to the key holding `version` too (EVERY_VERSION: all of them; 0: none more)."""
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)

        def load() -> Key | None:
            key = self._fresh.get_key(tenant_id, key_id)
            if key is None or version == 0:
                return key
            if version == EVERY_VERSION:
                return with_every_version(self._fresh, key)
            return with_version(self._fresh, key, version)

        def checked(key: Key) -> Key:
            if key.key_type is KeyType.MASTER:
                raise KeyTypeMismatch(
                    key_id,
                    f"key {key_id} is the tenant's master key: its versions are destroyed only with the whole "
                    "tenant (ScheduleTenantDestruction)",
                )
            return transform(key)

        return self._write(load, checked, key_id)

    def _write(self, load: Callable[[], Key | None], transform: Callable[[Key], Key], key_id: str) -> Key:
        for _ in range(MAX_ATTEMPTS):
            key = load()
            if key is None:
                raise KeyNotFound(key_id)
            changed = transform(key)
            if changed == key:
                return key  # nothing to change (a repeat): no write, no invalidation
            if self._store.update_version_states(changed, key.revision):
                self._invalidate(changed)
                return changed
        raise ConcurrentModification(f"key {key_id} is being changed concurrently by many callers; retry")

    def _invalidate(self, key: Key) -> None:
        if key.key_type is KeyType.MASTER:
            # Every key of the tenant is unwrapped through the master key.
            self._invalidation.tenant_changed(key.tenant_id)
        else:
            self._invalidation.key_changed(key.tenant_id, key.key_id)

    # -- tenants ----------------------------------------------------------------------

    def schedule_tenant_destruction(self, tenant_id: str, waiting_period: timedelta | None = None) -> Key:
        """Schedule every version of the tenant's master key; the tenant's keys refuse every use meanwhile.
        A tenant already scheduled keeps its time."""
        validate_tenant_id(tenant_id)
        destroy_at = destruction_time(self._clock.now(), waiting_period)

        def schedule(master: Key) -> Key:
            if master.primary.destroyed:
                raise TenantDestroyed(tenant_id)
            return with_key_destruction_scheduled(master, destroy_at)

        return self._write(lambda: with_every_version(self._fresh, self._master(tenant_id)), schedule, tenant_id)

    def cancel_tenant_destruction(self, tenant_id: str) -> Key:
        validate_tenant_id(tenant_id)

        def cancel(master: Key) -> Key:
            if master.primary.destroyed:
                raise TenantDestroyed(tenant_id)
            destroy_at = master.primary.destroy_at
            if destroy_at is None:
                raise KeyVersionStateConflict(master.key_id, f"tenant {tenant_id!r} is not scheduled for destruction")
            if destroy_at <= self._clock.now():
                # The pass may be destroying the tenant's keys now: a cancel acknowledged then would leave some
                # destroyed. Like a version's destruction, a tenant's is cancelled until its time, not after.
                raise KeyVersionStateConflict(
                    master.key_id,
                    f"tenant {tenant_id!r}'s destruction time ({destroy_at.isoformat()}) has come: it is being "
                    "carried out and can no longer be cancelled",
                )
            return with_destruction_cancelled(master)

        return self._write(lambda: self._master(tenant_id), cancel, tenant_id)

    def _master(self, tenant_id: str) -> Key:
        master = self._fresh.get_master_key(tenant_id)
        if master is None:
            raise TenantNotFound(tenant_id)
        return master

    # -- carrying destruction out -------------------------------------------------------

    def destroy_due(self, tenant_id: str, key_id: str) -> list[int]:
        """Destroy what is due of one key (found by the store's schedule; re-checked here on the authenticated
        key): the versions destroyed now. A master key due destroys its whole tenant."""
        key = self._fresh.get_key(tenant_id, key_id)
        if key is None:
            return []
        now = self._clock.now()
        if key.key_type is KeyType.MASTER:
            if _tenant_due(key, now):
                return self._destroy_tenant(key, now)
            # Never part of a master key alone: its schedule is the tenant's.
            return []
        due = due_versions(key, now)
        # Also with nothing newly due: a store whose erasure stopped part-way (MongoDB's two collections) is
        # finished by the same write, which also stores the key's next destruction time afresh.
        # Chosen again on every attempt: a cancellation that won the race is honoured.
        self._destroy(key, lambda current: due_versions(current, now), now)
        return due

    def _destroy(
        self, key: Key, choose: Callable[[Key], list[int] | None], now: datetime, *, every: bool = False
    ) -> bool:
        """Destroy the versions `choose` picks from the key as it is at each attempt (None: nothing is to be
        written any more, e.g. a cancellation won), from every version it has with `every` (else from those it
        holds, which include every one scheduled); whether the write was made."""
        tenant_id, key_id = key.tenant_id, key.key_id
        current: Key | None = key
        for _ in range(MAX_ATTEMPTS):
            if current is None:
                return False
            if every:
                current = with_every_version(self._fresh, current)
            chosen = choose(current)
            if chosen is None:
                return False
            destroyed = with_versions_destroyed(current, chosen, now)
            if self._store.update_version_states(destroyed, current.revision):
                self._invalidate(current)
                return True
            current = self._fresh.get_key(tenant_id, key_id)
        raise ConcurrentModification(f"key {key_id} is being changed concurrently; its destruction is retried")

    def _still_due(self, tenant_id: str, now: datetime) -> Key | None:
        """The tenant's master key read afresh if its destruction is still due; None if it was cancelled or
        moved later meanwhile (logged: the pass stops)."""
        master = self._fresh.get_master_key(tenant_id)
        if master is not None and _tenant_due(master, now):
            return master
        log.warning("tenant destruction stopped: it was cancelled while running", extra={"tenant_id": tenant_id})
        return None

    def _destroy_tenant(self, master: Key, now: datetime) -> list[int]:
        tenant_id = master.tenant_id
        skipped = 0
        after: ListCursor | None = None
        while True:
            # Only ids (and the page's cursor) come from this unchecked listing: one altered key must not stop
            # the listing of the others. Each key is read again, checked, before anything is decided.
            page = self._listing.list_keys(KeyQuery(tenant_id=tenant_id, limit=TENANT_PAGE, now=now, after=after))
            for listed in page:
                if listed.key_type is KeyType.MASTER:
                    continue
                if self._still_due(tenant_id, now) is None:
                    return []
                if not self._destroy_tenant_key(tenant_id, listed.key_id, now):
                    skipped += 1
            if len(page) < TENANT_PAGE:
                break
            after = ListCursor(page[-1].created_at, page[-1].key_id)
        current = self._still_due(tenant_id, now)
        if current is None:
            return []
        current = with_every_version(self._fresh, current)
        numbers = [v.version for v in current.versions if not v.destroyed]
        if not self._destroy(
            current, lambda latest: _every_version(latest) if _tenant_due(latest, now) else None, now, every=True
        ):
            log.warning("tenant destruction stopped: it was cancelled while running", extra={"tenant_id": tenant_id})
            return []
        self._invalidation.tenant_changed(tenant_id)
        log.info("tenant destroyed", extra={"tenant_id": tenant_id, "key_id": current.key_id, "skipped": skipped})
        return numbers

    def _destroy_tenant_key(self, tenant_id: str, key_id: str, now: datetime) -> bool:
        """Destroy every version of one key of a tenant being destroyed; False if it had to be skipped."""
        try:
            key = self._fresh.get_key(tenant_id, key_id)
            if key is not None and key.key_type is not KeyType.MASTER:
                self._destroy(key, _every_version, now, every=True)
        except KeyIntegrityError:
            # Counted (caas_crypto_key_integrity_failures_total) by the integrity check. Its material is wrapped
            # under the master key, destroyed next: unrecoverable all the same, though still stored.
            log.error(
                "tenant destruction skipped a key that fails its integrity check (the store was altered); its "
                "wrapped material stays stored, unrecoverable once the master key is destroyed",
                extra={"tenant_id": tenant_id, "key_id": key_id},
            )
            return False
        return True


def _tenant_due(master: Key, now: datetime) -> bool:
    """Whether a tenant's destruction is due (or done and being finished) by its master key."""
    primary = master.primary
    return primary.destroyed or (primary.destroy_at is not None and primary.destroy_at <= now)


def _every_version(key: Key) -> list[int] | None:
    """Every version of `key`, which holds them all (read with `every`)."""
    return [v.version for v in key.versions]


# _change's version for a change that decides about every version of the key.
EVERY_VERSION = -1
