"""Reading the versions a key does not hold (domain/keys.py): one, or every one, page by page.

A key read from the store holds its primary and the versions with a state of
their own, so that reading it costs the same at 10 versions as at 10,000. The
few use cases that decide about one other version (DisableKeyVersion, ...) or
about all of them (ScheduleKeyDestruction, a tenant's destruction, an export)
read them here; every version read is checked by its own tag on the way
(storage/integrity.py).
"""

from __future__ import annotations

from crypto_server.domain.errors import KeyIntegrityError
from crypto_server.domain.keys import Key, KeyVersion
from crypto_server.storage.port import KeyReader

# Versions per store read when reading them all.
VERSIONS_PAGE = 1000


def with_version(reader: KeyReader, key: Key, number: int) -> Key:
    """`key` holding version `number` too (unchanged when it holds it already or has no such version)."""
    if key.version(number) is not None or not 1 <= number <= key.primary_version:
        return key
    return key.with_versions(reader.list_versions(key.tenant_id, key.key_id, number - 1, 1))


def with_every_version(reader: KeyReader, key: Key) -> Key:
    """`key` holding every version it has (KeyIntegrityError when the store has lost one). The versions it
    held already keep the state they have in it (the state its tag vouches for); a version read here that shows
    a state is newer than `key`, which a write based on it then finds out (every write is a compare-and-set on
    the key's revision)."""
    if key.holds_every_version:
        return key
    held = {v.version for v in key.versions}
    read: list[KeyVersion] = []
    after = 0
    while after < key.primary_version:
        page = reader.list_versions(key.tenant_id, key.key_id, after, VERSIONS_PAGE)
        if not page:
            break
        read.extend(v for v in page if v.version not in held)
        after = page[-1].version
    whole = key.with_versions(read).with_versions(key.versions)
    if not whole.holds_every_version:
        raise KeyIntegrityError(f"key {key.key_id} has lost versions from the store")
    return whole
