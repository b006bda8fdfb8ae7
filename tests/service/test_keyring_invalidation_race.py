"""A key read that started before DisableKey must not put the old, enabled key back into the keyring."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.errors import KeyDisabled
from crypto_server.domain.keys import Key, KeyType
from crypto_server.service.crypto_operations import CryptoOperations
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.keyring import Keyring
from crypto_server.storage.port import LocalInvalidation
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock


class _SlowReads(SqliteKeyStore):
    """The first read of a data key, once armed, waits before returning: the window an invalidation can
    fall into. Later reads (DisableKey's own) go through."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.hold: threading.Event | None = None
        self.read_done = threading.Event()

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        key = super().get_key(tenant_id, key_id)
        hold = self.hold
        if hold is not None and key is not None and key.key_type is KeyType.DATA and not self.read_done.is_set():
            self.read_done.set()
            assert hold.wait(10), "the test releases the read"
        return key


@pytest.mark.parametrize("scope", ["key", "tenant", "all"])
def test_a_read_that_overlaps_an_invalidation_is_not_kept(tmp_path: Path, scope: str) -> None:
    store = _SlowReads(tmp_path)
    keyring = Keyring(store, AESGCM(os.urandom(32)), ttl_s=300, max_keys=100)
    lifecycle = KeyLifecycle(
        store, keyring, FakeClock(), LocalInvalidation(keyring), schedule=store, request_key_id_secret=b"s" * 32
    )
    operations = CryptoOperations(keyring, FakeClock())
    key = lifecycle.create_key("t1", KeyType.DATA)

    store.hold = threading.Event()
    reader = threading.Thread(target=operations.encrypt, args=("t1", key.key_id, b"x"))
    reader.start()
    assert store.read_done.wait(10)
    # The read has the enabled key in hand; now the key is disabled and the keyring told so.
    if scope == "key":
        lifecycle.disable_key("t1", key.key_id)
    else:
        stored = store.get_key("t1", key.key_id)
        assert stored is not None
        assert store.update_key(stored.with_disabled(True), stored.revision)
        if scope == "tenant":
            keyring.forget_tenant("t1")
        else:
            keyring.forget_all()
    store.hold.set()
    reader.join(10)
    store.hold = None

    assert keyring.fresh("t1", key.key_id) is None, "the stale read was not cached"
    with pytest.raises(KeyDisabled):
        operations.encrypt("t1", key.key_id, b"after DisableKey answered")
    store.close()


def test_reads_without_an_invalidation_are_kept(tmp_path: Path) -> None:
    store = SqliteKeyStore(tmp_path)
    keyring = Keyring(store, AESGCM(os.urandom(32)), ttl_s=300, max_keys=100)
    lifecycle = KeyLifecycle(
        store, keyring, FakeClock(), LocalInvalidation(keyring), schedule=store, request_key_id_secret=b"s" * 32
    )
    key = lifecycle.create_key("t1", KeyType.DATA)
    keyring.forget_all()
    keyring.get("t1", key.key_id)
    assert keyring.fresh("t1", key.key_id) is not None
    store.close()
