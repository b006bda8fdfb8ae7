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

    def _refused(self, tenant_id: str, key_id: str, what: str) -> KeyIntegrityError:
        if self._on_failure is not None:
            self._on_failure()
        log.error(
            "stored key metadata fails its integrity check; refusing to use the key",
            extra={"tenant_id": tenant_id, "key_id": key_id},
        )
        return KeyIntegrityError(
            f"key {key_id}'s stored {what} fails its integrity check (the key store was altered); the key is not used"
        )

    def _checked(self, key: Key | None) -> Key | None:
        if key is None:
            return None
        if not _held_as_read(key):
            # The tags cannot tell: a primary with no state of its own is vouched for only by its own tag, which a
            # deleted row takes with it.
            raise self._refused(key.tenant_id, key.key_id, "versions")
        if self._authenticator.verify(key):
            return key
        upgraded = self._tagged_before_split(key)
        if upgraded is not None:
            return upgraded
        raise self._refused(key.tenant_id, key.key_id, "metadata")

    def _tagged_before_split(self, key: Key) -> Key | None:
        """`key` re-tagged, if it is a key tagged before versions had tags of their own and that tag, checked over
        every version, holds; None otherwise. The new tags are stored (once: a concurrent writer's change wins and
        the next read re-tags)."""
        if key.integrity_tag == b"":
            return None
        whole = key.with_versions(self._all_versions(key, self._inner.list_versions))
        if not self._authenticator.verify_before_split(whole):
            return None
        tagged = self._authenticator.tagged(whole)
        if self._inner.store_tags(tagged, key.revision):
            log.info("key metadata re-tagged per version", extra={"tenant_id": key.tenant_id, "key_id": key.key_id})
            tagged = replace(tagged, revision=key.revision + 1)
        return replace(tagged, versions=tuple(v for v in tagged.versions if v.version in _numbers(key)))

    @staticmethod
    def _all_versions(key: Key, list_versions: Callable[[str, str, int, int], list[KeyVersion]]) -> list[KeyVersion]:
        versions: list[KeyVersion] = []
        while True:
            page = list_versions(key.tenant_id, key.key_id, versions[-1].version if versions else 0, _PAGE)
            versions.extend(page)
            if len(page) < _PAGE:
                return versions

    def _checked_versions(self, tenant_id: str, key_id: str, versions: list[KeyVersion]) -> list[KeyVersion]:
        for version in versions:
            if not self._authenticator.verify_version(tenant_id, key_id, version):
                raise self._refused(tenant_id, key_id, f"version {version.version}")
        return versions

    # -- reads -----------------------------------------------------------------

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        return self._checked(self._inner.get_key(tenant_id, key_id))

    def get_master_key(self, tenant_id: str) -> Key | None:
        return self._checked(self._inner.get_master_key(tenant_id))

    def list_keys(self, query: KeyQuery) -> list[Key]:
        return [key for key in map(self._checked, self._inner.list_keys(query)) if key is not None]

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        """Each version checked by its own tag, and the page checked for a gap (versions are 1 to the primary,
        each stored: a page that skips a number lost a version). Their states are vouched for by the key's tag,
        which the caller checks on the key it read (service/key_versions.py)."""
        versions = self._inner.list_versions(tenant_id, key_id, after_version, limit)
        if [v.version for v in versions] != list(range(after_version + 1, after_version + 1 + len(versions))):
            raise self._refused(tenant_id, key_id, "versions")
        return self._checked_versions(tenant_id, key_id, versions)

    def version_for_request(self, tenant_id: str, key_id: str, request_id: str) -> KeyVersion | None:
        version = self._inner.version_for_request(tenant_id, key_id, request_id)
        if version is not None:
            self._checked_versions(tenant_id, key_id, [version])
        return version

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        # No tag covers a pending version yet; the rotation that finishes it checks that it unwraps.
        return self._inner.pending_version(tenant_id, key_id, number)

    # -- writes ----------------------------------------------------------------

    def insert_key(self, key: Key) -> None:
        self._inner.insert_key(self._authenticator.tagged(key))

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        return self._inner.add_version(self._authenticator.tagged(updated), expected_revision)

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        return self._inner.update_key(self._authenticator.tagged(updated), expected_revision)

    def update_version_states(self, updated: Key, expected_revision: int) -> bool:
        return self._inner.update_version_states(self._authenticator.tagged(updated), expected_revision)

    def store_tags(self, updated: Key, expected_revision: int) -> bool:
        return self._inner.store_tags(self._authenticator.tagged(updated), expected_revision)


# Versions per read while checking a key tagged before the split.
_PAGE = 1000


def _numbers(key: Key) -> set[int]:
    return {v.version for v in key.versions}


def _held_as_read(key: Key) -> bool:
    """Whether `key` holds its primary, each version once, ascending, none above the primary, as a store read
    gives it."""
    numbers = [v.version for v in key.versions]
    return bool(numbers) and numbers == sorted(set(numbers)) and numbers[0] >= 1 and numbers[-1] == key.primary_version
