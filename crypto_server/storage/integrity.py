"""The key store as the service sees it: every key's metadata authenticated on the way in and out.

Outermost of the store decorators (above the Redis cache), so a key read from
Redis is checked exactly like one read from the database. Writes are tagged
here, so the service never handles tags; reads whose tag does not match are
refused with KeyIntegrityError (DATA_LOSS to the caller), logged and counted,
never served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime, timedelta

from crypto_server.domain.errors import KeyIntegrityError
from crypto_server.domain.key_integrity import MetadataAuthenticator
from crypto_server.domain.keys import Key, KeyVersion
from crypto_server.storage.port import KeyChange, KeyCounts, KeyQuery, KeyStore, VersionRef

log = logging.getLogger(__name__)


class AuthenticatedKeyStore:
    """A KeyStore whose keys carry an integrity tag, computed on write and checked on read."""

    def __init__(
        self,
        inner: KeyStore,
        authenticator: MetadataAuthenticator,
        *,
        on_failure: Callable[[], None] | None = None,
    ) -> None:
        self._inner = inner
        self._authenticator = authenticator
        self._on_failure = on_failure

    def _checked(self, key: Key | None) -> Key | None:
        if key is None or self._authenticator.verify(key):
            return key
        if self._on_failure is not None:
            self._on_failure()
        log.error(
            "stored key metadata fails its integrity check; refusing to use the key",
            extra={"tenant_id": key.tenant_id, "key_id": key.key_id},
        )
        raise KeyIntegrityError(
            f"key {key.key_id}'s stored metadata fails its integrity check (the key store was altered); "
            "the key is not used"
        )

    def _tagged(self, key: Key) -> Key:
        return replace(key, integrity_tag=self._authenticator.tag(key))

    # -- reads -----------------------------------------------------------------

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        return self._checked(self._inner.get_key(tenant_id, key_id))

    def get_master_key(self, tenant_id: str) -> Key | None:
        return self._checked(self._inner.get_master_key(tenant_id))

    def list_keys(self, query: KeyQuery) -> list[Key]:
        return [key for key in map(self._checked, self._inner.list_keys(query)) if key is not None]

    def master_keys(self) -> Iterator[Key]:
        for key in self._inner.master_keys():
            checked = self._checked(key)
            assert checked is not None
            yield checked

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        # No tag covers a pending version yet; the rotation that finishes it checks that it unwraps.
        return self._inner.pending_version(tenant_id, key_id, number)

    # -- writes ----------------------------------------------------------------

    def insert_key(self, key: Key) -> None:
        self._inner.insert_key(self._tagged(key))

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        return self._inner.add_version(self._tagged(updated), expected_revision)

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        return self._inner.update_key(self._tagged(updated), expected_revision)

    def update_version_states(self, updated: Key, expected_revision: int) -> bool:
        return self._inner.update_version_states(self._tagged(updated), expected_revision)

    def keys_due_for_destruction(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self._inner.keys_due_for_destruction(now, limit)

    # -- the rest, unchanged -----------------------------------------------------

    def replace_wrapped_material(self, tenant_id: str, key_id: str, version: int, old: bytes, new: bytes) -> bool:
        return self._inner.replace_wrapped_material(tenant_id, key_id, version, old, new)

    def get_root_key_check(self) -> bytes | None:
        return self._inner.get_root_key_check()

    def set_root_key_check(self, check: bytes) -> bytes:
        return self._inner.set_root_key_check(check)

    def replace_root_key_check(self, check: bytes) -> None:
        self._inner.replace_root_key_check(check)

    def get_meta(self, name: str) -> bytes | None:
        return self._inner.get_meta(name)

    def add_meta(self, name: str, value: bytes) -> bytes:
        return self._inner.add_meta(name, value)

    def replace_meta(self, name: str, value: bytes) -> None:
        self._inner.replace_meta(name, value)

    def changed_keys(self, since: datetime) -> list[KeyChange]:
        return self._inner.changed_keys(since)

    def keys_due_for_rotation(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self._inner.keys_due_for_rotation(now, limit)

    def reschedule_rotation(
        self, tenant_id: str, key_id: str, expected_revision: int, next_rotation_at: datetime | None
    ) -> None:
        self._inner.reschedule_rotation(tenant_id, key_id, expected_revision, next_rotation_at)

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        # Outside the tag (service/usage_budget.py says why and what altering a count can do).
        return self._inner.add_encryptions(counts)

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        self._inner.mark_rotation_due(version, now)

    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        return self._inner.acquire_lease(name, holder, now, ttl)

    def release_lease(self, name: str, holder: str) -> None:
        self._inner.release_lease(name, holder)

    def has_keys(self) -> bool:
        return self._inner.has_keys()

    def ping(self) -> None:
        self._inner.ping()

    def key_counts(self, now: datetime) -> KeyCounts:
        return self._inner.key_counts(now)

    def close(self) -> None:
        self._inner.close()
