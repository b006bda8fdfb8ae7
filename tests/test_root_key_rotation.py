"""Root key rotation without downtime: unwrap under either root key, re-wrap, retire the old one."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.app import open_key_store
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.key_wrap import UnwrapFailed
from crypto_server.rewrap_root import rewrap_master_keys
from crypto_server.service.keyring import unwrap_version
from tests.conftest import StartServer


def _write(path: Path, key: str) -> Path:
    path.write_text(key + "\n")
    return path


def test_rotating_the_root_key_keeps_every_key_and_ciphertext(
    start_server: StartServer, root_key: str, tmp_path: Path
) -> None:
    new_key = base64.b64encode(os.urandom(32)).decode()
    old_file, new_file = _write(tmp_path / "old.key", root_key), _write(tmp_path / "new.key", new_key)

    first = start_server()  # the old root key
    sealed = []
    for tenant in ("t1", "t2"):
        key = first.create_key(tenant)
        sealed.append((tenant, first.encrypt(tenant, key.key_id, b"secret of " + tenant.encode()).ciphertext))
    master = first.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1", key_type=resources_pb2.KEY_TYPE_MASTER))
    first.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=master.keys[0].key_id))
    first.stop()

    # Step 2: the new root key wraps, the old one still unwraps.
    both = start_server(root_key=None, root_key_file=new_file, other_root_key_file=old_file)
    for tenant, ciphertext in sealed:
        assert both.decrypt(tenant, ciphertext).plaintext == b"secret of " + tenant.encode()
    t3 = both.create_key("t3")  # a new tenant: its master key is wrapped under the new root key
    sealed.append(("t3", both.encrypt("t3", t3.key_id, b"secret of t3").ciphertext))
    settings = both.settings
    both.stop()

    # Step 3: re-wrap.
    store = open_key_store(settings)
    try:
        report = rewrap_master_keys(store, AESGCM(base64.b64decode(new_key)), AESGCM(base64.b64decode(root_key)))
        assert (report.master_keys, report.versions_rewrapped, report.versions_already_rewrapped) == (3, 3, 1)
        again = rewrap_master_keys(store, AESGCM(base64.b64decode(new_key)), AESGCM(base64.b64decode(root_key)))
        assert (again.versions_rewrapped, again.versions_already_rewrapped) == (0, 4), "idempotent"
        for master_key in store.master_keys():
            for record in master_key.versions:
                with pytest.raises(UnwrapFailed):
                    unwrap_version(AESGCM(base64.b64decode(root_key)), master_key, record)
    finally:
        store.close()

    # Step 4: the new root key alone; the old one is refused.
    only_new = start_server(root_key=None, root_key_file=new_file)
    for tenant, ciphertext in sealed:
        assert only_new.decrypt(tenant, ciphertext).plaintext == b"secret of " + tenant.encode()
    only_new.create_key("t1")
    only_new.stop()
    with pytest.raises(ConfigError, match="root key is not the one"):
        start_server()


def test_the_other_root_key_needs_a_root_key(tmp_path: Path) -> None:

    with pytest.raises(ConfigError, match="CRYPTO_OTHER_ROOT_KEY_FILE"):
        Settings.from_env({"CRYPTO_OTHER_ROOT_KEY_FILE": str(tmp_path / "x")})
