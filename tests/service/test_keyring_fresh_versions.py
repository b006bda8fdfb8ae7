"""A ciphertext naming a version newer than the cache gives: the database is read (issue 22, found by `make chaos`
with Redis restored from an older snapshot: the other replica's fresh ciphertext failed DECRYPTION_FAILED,
which a caller never retries)."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.keys import Key, KeyType
from crypto_server.service.crypto_operations import CryptoOperations
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.keyring import Keyring
from crypto_server.storage.port import LocalInvalidation
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock


class _CacheThatLostWrites:
    """A cache in front of the database that keeps serving the first copy it gave of each key, whatever was
    written since (Redis restarted from a snapshot taken before a rotation)."""

    def __init__(self, database: SqliteKeyStore) -> None:
        self.database = database
        self.copies: dict[str, Key] = {}

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        if key_id not in self.copies:
            key = self.database.get_key(tenant_id, key_id)
            if key is None:
                return None
            self.copies[key_id] = key
        return self.copies[key_id]

    def __getattr__(self, name: str) -> object:
        return getattr(self.database, name)


def test_a_version_newer_than_the_cache_gives_is_read_from_the_database(tmp_path: Path) -> None:
    database = SqliteKeyStore(tmp_path)
    root = AESGCM(os.urandom(32))
    clock = FakeClock()
    cache = _CacheThatLostWrites(database)
    # Replica a reads keys through the stale cache; replica b rotates and encrypts with the new version.
    keyring_a = Keyring(cache, root, ttl_s=300, max_keys=100, fresh=database)
    keyring_b = Keyring(database, root, ttl_s=300, max_keys=100)
    lifecycle_b = KeyLifecycle(
        database, keyring_b, clock, LocalInvalidation(keyring_b), schedule=database, request_key_id_secret=b"s" * 32
    )
    a, b = CryptoOperations(keyring_a, clock), CryptoOperations(keyring_b, clock)
    key = lifecycle_b.create_key("t1", KeyType.DATA)
    a.encrypt("t1", key.key_id, b"warm")  # a holds version 1, and the cache keeps serving it

    lifecycle_b.rotate_key("t1", key.key_id)
    sealed = b.encrypt("t1", key.key_id, b"made with version 2")
    keyring_a.forget("t1", key.key_id)  # even read afresh, the cache gives version 1

    opened = a.decrypt("t1", sealed.ciphertext)
    assert opened.plaintext == b"made with version 2"
    assert opened.key_version == 2
    database.close()
