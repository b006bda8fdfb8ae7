"""The key store as the service sees it: every key's metadata authenticated on the way in and out.

Outermost of the store decorators (above the Redis cache), so a key read from
Redis is checked exactly like one read from the database. Writes are tagged
here, so the service never handles tags; reads whose tag does not match are
refused with KeyIntegrityError (DATA_LOSS to the caller), logged and counted,
never served.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from crypto_server.domain.errors import KeyIntegrityError
from crypto_server.domain.key_integrity import MetadataAuthenticator
from crypto_server.domain.keys import Key, KeyVersion
from crypto_server.storage.port import KeyQuery, KeyServing

log = logging.getLogger(__name__)


class AuthenticatedKeyStore:
    """The key reading and writing roles of a store, with keys that carry an integrity tag, computed on write
    and checked on read. The store's other roles hold nothing the tag covers: app.py wires them directly."""

    def __init__(
        self,
        inner: KeyServing,
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

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        # Passed through for now: the caller (KeyLifecycle.list_key_versions) has checked the key's tag with
        # get_key first. Each version gets a tag of its own, checked here, when versions are tagged one by one.
        return self._inner.list_versions(tenant_id, key_id, after_version, limit)
