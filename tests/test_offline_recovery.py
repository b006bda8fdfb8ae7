"""An operator can recover keys and plaintext offline, from the root key file, the SQLite rows and the page alone.

The recovery (tests/offline_recovery.py) follows docs/ciphertext-format.md and uses no crypto_server code: if the
page and what the server writes drift apart, this fails.
"""

from __future__ import annotations

import os
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests import offline_recovery as page
from tests.conftest import StartServer, write_root_key_file

TENANT = "acme.corp"


def _backup(live: Path, copy: Path) -> Path:
    """What the operations guide prescribes (`sqlite3 keys.sqlite3 ".backup copy"`): a consistent copy."""
    with closing(sqlite3.connect(live)) as source, closing(sqlite3.connect(copy)) as target:
        source.backup(target)
    return copy


@pytest.mark.parametrize("backend", ["embedded"])
def test_operator_recovers_every_kind_of_key_and_a_ciphertext_offline(
    start_server: StartServer, root_key: str, tmp_path: Path
) -> None:
    root_key_file = write_root_key_file(tmp_path / "root.key", root_key)
    server = start_server(root_key=None, root_key_file=root_key_file)

    data_key = server.create_key(TENANT)
    sealed_before = server.encrypt(TENANT, data_key.key_id, b"under data key v1", b"order-1").ciphertext
    (master,) = server.keys.ListKeys(
        key_pb.ListKeysRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_MASTER)
    ).keys
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=master.key_id))
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=data_key.key_id))
    sealed_after = server.encrypt(TENANT, data_key.key_id, b"under data key v2", b"order-2").ciphertext

    mac_key = server.create_key(TENANT, algorithm=resources_pb2.ALGORITHM_HMAC_SHA256)
    mac = server.crypto.ComputeMac(crypto_pb.ComputeMacRequest(tenant_id=TENANT, key_id=mac_key.key_id, data=b"m"))
    public_keys = {}
    for algorithm in (resources_pb2.ALGORITHM_ED25519, resources_pb2.ALGORITHM_ECDSA_P256_SHA256):
        signer = server.create_key(TENANT, algorithm=algorithm)
        public_keys[signer.key_id] = server.crypto.GetPublicKey(
            crypto_pb.GetPublicKeyRequest(tenant_id=TENANT, key_id=signer.key_id)
        )
    session = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id=TENANT))

    store = page.StoreFile(_backup(server.settings.data_dir / "keys.sqlite3", tmp_path / "copy.sqlite3"))
    try:
        root = page.read_root_key_file(root_key_file)
        assert page.root_key_check_opens(root, store.root_key_check())
        assert not page.root_key_check_opens(os.urandom(32), store.root_key_check())

        # The master key's versions are under the root key; each data key version under the master version
        # that was primary when it was made.
        assert [store.version(master.key_id, v).parent_version for v in (1, 2)] == [0, 0]
        assert [store.version(data_key.key_id, v).parent_version for v in (1, 2)] == [1, 2]

        for sealed, version, aad, plaintext in (
            (sealed_before, 1, b"order-1", b"under data key v1"),
            (sealed_after, 2, b"order-2", b"under data key v2"),
        ):
            header = page.read_ciphertext_header(sealed)
            assert (header.key_id, header.key_version) == (data_key.key_id, version)
            material = page.recover_material(store, root, header.key_id, header.key_version)
            assert page.decrypt_v1(material, TENANT, sealed, aad) == plaintext

        assert page.hmac_sha256(page.recover_material(store, root, mac_key.key_id, 1), b"m") == mac.mac
        for key_id, public_key in public_keys.items():
            signing_key = page.signing_key(store.key(key_id).algorithm, page.recover_material(store, root, key_id, 1))
            assert (
                signing_key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                == public_key.pem.encode()
            )
        assert page.recover_material(store, root, session.key.key_id, 1) == session.key_material
    finally:
        store.close()
