"""Reading the versions a key does not hold (domain/keys.py): one, or every one, page by page.

A key read from the store holds its primary and the versions with a state of
their own, so that reading it costs the same at 10 versions as at 10,000. The
use cases that decide about one other version (DisableKeyVersion, ...), show
them (ListKeyVersions) or need all of them (ScheduleKeyDestruction, a tenant's
destruction, an export) read them here. Every version read is checked by its
own tag on the way (storage/integrity.py); its state is vouched for by its
key's tag, which lists every version that has one: a version the key holds is
taken as the key holds it, and one it does not hold that shows a state means
the key read is older than the row (it is read again) or the row was altered.
"""

from __future__ import annotations

from collections.abc import Callable

from crypto_server.domain.errors import KeyIntegrityError, KeyNotFound
from crypto_server.domain.keys import Key, KeyVersion
from crypto_server.storage.port import KeyReader

# Versions per store read when reading them all.
VERSIONS_PAGE = 1000
# Reads of the key when versions read show states it does not list (a change landing in between, each time).
_ATTEMPTS = 3


def vouched_versions(
    reader: KeyReader, key: Key, read: Callable[[Key], list[KeyVersion]]
) -> tuple[Key, list[KeyVersion]]:
    """The versions `read` returns for `key`, each as the key vouches for it, and the key they were checked
    against (read again when a version shows a state the key does not list)."""
    for attempt in range(_ATTEMPTS):
        versions = _as_vouched(key, read(key))
        if versions is not None:
            return key, versions
        if attempt == _ATTEMPTS - 1:
            break
        fresh = reader.get_key(key.tenant_id, key.key_id)
        if fresh is None:
            raise KeyNotFound(key.key_id)
        key = fresh
    raise KeyIntegrityError(
        f"key {key.key_id} has a version whose stored state its metadata does not list (the key store was altered)"
    )


def _as_vouched(key: Key, versions: list[KeyVersion]) -> list[KeyVersion] | None:
    vouched = []
    for version in versions:
        held = key.version(version.version)
        if held is not None:
            vouched.append(held)
        elif version.has_state:
            return None
        else:
            vouched.append(version)
    return vouched


def with_version(reader: KeyReader, key: Key, number: int) -> Key:
    """`key` holding version `number` too (unchanged when it holds it already or has no such version); the key
    may be a newer read of it."""
    if key.version(number) is not None or not 1 <= number <= key.primary_version:
        return key
    key, versions = vouched_versions(reader, key, lambda k: reader.list_versions(k.tenant_id, k.key_id, number - 1, 1))
    if [v.version for v in versions] != [number] and key.version(number) is None:
        raise KeyIntegrityError(f"key {key.key_id} has lost version {number} from the store")
    return key.with_versions(versions)


def with_every_version(reader: KeyReader, key: Key) -> Key:
    """`key` holding every version it has (KeyIntegrityError when the store has lost one); the key may be a newer
    read of it."""
    if key.holds_every_version:
        return key

    def every(current: Key) -> list[KeyVersion]:
        read: list[KeyVersion] = []
        while not read or read[-1].version < current.primary_version:
            page = reader.list_versions(
                current.tenant_id, current.key_id, read[-1].version if read else 0, VERSIONS_PAGE
            )
            if not page:
                break
            read.extend(page)
        return read

    key, versions = vouched_versions(reader, key, every)
    whole = key.with_versions(versions)
    if not whole.holds_every_version:
        raise KeyIntegrityError(f"key {key.key_id} has lost versions from the store")
    return whole
