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
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import (
    ConcurrentModification,
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
from crypto_server.storage.port import Invalidation, KeyQuery, KeyServing, ListCursor

log = logging.getLogger(__name__)

# Each failed attempt means another writer changed the key; the bound only stops a pathological storm.
MAX_ATTEMPTS = 100
# Keys read per page while destroying a tenant.
TENANT_PAGE = 200


class KeyDestruction:
    def __init__(self, store: KeyServing, clock: Clock, invalidation: Invalidation) -> None:
        self._store = store
        self._clock = clock
        self._invalidation = invalidation

    # -- versions and keys ----------------------------------------------------------

    def disable_version(self, tenant_id: str, key_id: str, version: int) -> Key:
        return self._change(tenant_id, key_id, lambda key: with_version_disabled(key, version, True))

    def enable_version(self, tenant_id: str, key_id: str, version: int) -> Key:
        return self._change(tenant_id, key_id, lambda key: with_version_disabled(key, version, False))

    def schedule_version_destruction(
        self, tenant_id: str, key_id: str, version: int, waiting_period: timedelta | None = None
    ) -> Key:
        destroy_at = destruction_time(self._clock.now(), waiting_period)
        return self._change(tenant_id, key_id, lambda key: with_version_destruction_scheduled(key, version, destroy_at))

    def schedule_key_destruction(self, tenant_id: str, key_id: str, waiting_period: timedelta | None = None) -> Key:
        destroy_at = destruction_time(self._clock.now(), waiting_period)
        return self._change(tenant_id, key_id, lambda key: with_key_destruction_scheduled(key, destroy_at))

    def cancel_key_destruction(self, tenant_id: str, key_id: str, version: int = 0) -> Key:
        """Cancel the destruction of `version` (0: of every scheduled version) before it runs."""
        return self._change(tenant_id, key_id, lambda key: with_destruction_cancelled(key, version))

    def _change(self, tenant_id: str, key_id: str, transform: Callable[[Key], Key]) -> Key:
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)

        def checked(key: Key) -> Key:
            if key.key_type is KeyType.MASTER:
                raise KeyTypeMismatch(
                    key_id,
                    f"key {key_id} is the tenant's master key: its versions are destroyed only with the whole "
                    "tenant (ScheduleTenantDestruction)",
                )
            return transform(key)

        return self._write(lambda: self._store.get_key(tenant_id, key_id), checked, key_id)

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

        return self._write(lambda: self._master(tenant_id), schedule, tenant_id)

    def cancel_tenant_destruction(self, tenant_id: str) -> Key:
        validate_tenant_id(tenant_id)

        def cancel(master: Key) -> Key:
            if master.primary.destroyed:
                raise TenantDestroyed(tenant_id)
            if master.primary.destroy_at is None:
                raise KeyVersionStateConflict(master.key_id, f"tenant {tenant_id!r} is not scheduled for destruction")
            return with_destruction_cancelled(master)

        return self._write(lambda: self._master(tenant_id), cancel, tenant_id)

    def _master(self, tenant_id: str) -> Key:
        master = self._store.get_master_key(tenant_id)
        if master is None:
            raise TenantNotFound(tenant_id)
        return master

    # -- carrying destruction out -------------------------------------------------------

    def destroy_due(self, tenant_id: str, key_id: str) -> list[int]:
        """Destroy what is due of one key (found by the store's schedule; re-checked here on the authenticated
        key): the versions destroyed now. A master key due destroys its whole tenant."""
        key = self._store.get_key(tenant_id, key_id)
        if key is None:
            return []
        now = self._clock.now()
        if key.key_type is KeyType.MASTER:
            if key.primary.destroyed or (key.primary.destroy_at is not None and key.primary.destroy_at <= now):
                return self._destroy_tenant(key, now)
            # Never part of a master key alone: its schedule is the tenant's.
            return []
        due = due_versions(key, now)
        # Also with nothing newly due: a store whose erasure stopped part-way (MongoDB's two collections) is
        # finished by the same write, which also stores the key's next destruction time afresh.
        # Chosen again on every attempt: a cancellation that won the race is honoured.
        self._destroy(key, lambda current: due_versions(current, now), now)
        return due

    def _destroy(self, key: Key, choose: Callable[[Key], list[int]], now: datetime) -> None:
        tenant_id, key_id = key.tenant_id, key.key_id
        current: Key | None = key
        for _ in range(MAX_ATTEMPTS):
            if current is None:
                return
            destroyed = with_versions_destroyed(current, choose(current), now)
            if self._store.update_version_states(destroyed, current.revision):
                self._invalidate(current)
                return
            current = self._store.get_key(tenant_id, key_id)
        raise ConcurrentModification(f"key {key_id} is being changed concurrently; its destruction is retried")

    def _destroy_tenant(self, master: Key, now: datetime) -> list[int]:
        tenant_id = master.tenant_id
        after: ListCursor | None = None
        while True:
            page = self._store.list_keys(KeyQuery(tenant_id=tenant_id, limit=TENANT_PAGE, now=now, after=after))
            for key in page:
                if key.key_type is not KeyType.MASTER:
                    self._destroy(key, _every_version, now)
            if len(page) < TENANT_PAGE:
                break
            after = ListCursor(page[-1].created_at, page[-1].key_id)
        numbers = [v.version for v in master.versions if not v.destroyed]
        self._destroy(master, _every_version, now)
        self._invalidation.tenant_changed(tenant_id)
        log.info("tenant destroyed", extra={"tenant_id": tenant_id, "key_id": master.key_id})
        return numbers


def _every_version(key: Key) -> list[int]:
    return [v.version for v in key.versions]
