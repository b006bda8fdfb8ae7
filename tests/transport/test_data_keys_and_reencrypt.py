"""GenerateDataKey (envelope encryption) and ReEncrypt."""

from __future__ import annotations

import os

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain.errors import DecryptionFailed
from tests.conftest import ServerHandle, expect_error


@pytest.fixture
def backend() -> str:
    """One store: data keys and re-encryption use keys the keyring loaded, as Encrypt and Decrypt do (which run
    on every backend in tests/transport/test_round_trip.py and test_rotation_matrix.py)."""
    return "embedded"


def test_a_data_key_encrypts_locally_and_its_wrapped_copy_decrypts_through_the_service(server: ServerHandle) -> None:
    key = server.create_key("t1")
    generated = server.crypto.GenerateDataKey(
        crypto_pb.GenerateDataKeyRequest(tenant_id="t1", key_id=key.key_id, aad=b"file-7")
    )
    assert len(generated.plaintext) == 32
    assert (generated.key_id, generated.key_version) == (key.key_id, 1)
    # Encrypt locally with the plaintext data key, using cryptography directly.
    nonce = os.urandom(12)
    sealed_locally = AESGCM(generated.plaintext).encrypt(nonce, b"a large media file", b"")
    # Later: unwrap the stored copy through an ordinary Decrypt, and open the local ciphertext.
    unwrapped = server.decrypt("t1", generated.ciphertext, aad=b"file-7").plaintext
    assert unwrapped == generated.plaintext
    assert AESGCM(unwrapped).decrypt(nonce, sealed_locally, b"") == b"a large media file"


def test_without_plaintext_returns_only_the_wrapped_key(server: ServerHandle) -> None:
    key = server.create_key("t1")
    generated = server.crypto.GenerateDataKey(
        crypto_pb.GenerateDataKeyRequest(tenant_id="t1", key_id=key.key_id, without_plaintext=True)
    )
    assert generated.plaintext == b""
    assert len(server.decrypt("t1", generated.ciphertext).plaintext) == 32


def test_data_keys_are_fresh_each_time(server: ServerHandle) -> None:
    key = server.create_key("t1")
    request = crypto_pb.GenerateDataKeyRequest(tenant_id="t1", key_id=key.key_id)
    assert len({server.crypto.GenerateDataKey(request).plaintext for _ in range(20)}) == 20


def test_reencrypt_after_rotation_moves_to_the_new_version_without_returning_plaintext(server: ServerHandle) -> None:
    key = server.create_key("t1")
    old = server.encrypt("t1", key.key_id, b"migrate me", aad=b"ctx").ciphertext
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    moved = server.crypto.ReEncrypt(crypto_pb.ReEncryptRequest(tenant_id="t1", ciphertext=old, aad=b"ctx"))
    assert (moved.key_id, moved.key_version) == (key.key_id, 2)
    assert (moved.source_key_id, moved.source_key_version) == (key.key_id, 1)
    assert moved.ciphertext != old
    assert b"migrate me" not in moved.SerializeToString()
    assert [f.name for f in crypto_pb.ReEncryptResponse.DESCRIPTOR.fields if f.name == "plaintext"] == []
    opened = server.decrypt("t1", moved.ciphertext, aad=b"ctx")
    assert (opened.plaintext, opened.key_version) == (b"migrate me", 2)


def test_reencrypt_to_another_key_of_the_tenant(server: ServerHandle) -> None:
    source = server.create_key("t1")
    destination = server.create_key("t1", resources_pb2.KEY_TYPE_SESSION)
    old = server.encrypt("t1", source.key_id, b"x").ciphertext
    moved = server.crypto.ReEncrypt(
        crypto_pb.ReEncryptRequest(
            tenant_id="t1", ciphertext=old, source_key_id=source.key_id, destination_key_id=destination.key_id
        )
    )
    assert moved.key_id == destination.key_id
    assert server.decrypt("t1", moved.ciphertext, key_id=destination.key_id).plaintext == b"x"


def test_reencrypt_refuses_what_decrypt_refuses(server: ServerHandle) -> None:
    key = server.create_key("t1")
    other_tenant_key = server.create_key("t2")
    sealed = server.encrypt("t1", key.key_id, b"x", aad=b"a").ciphertext
    with pytest.raises(grpc.RpcError) as tampered:
        server.crypto.ReEncrypt(crypto_pb.ReEncryptRequest(tenant_id="t1", ciphertext=sealed, aad=b"b"))
    assert tampered.value.details() == DecryptionFailed.MESSAGE
    expect_error(
        lambda: server.crypto.ReEncrypt(
            crypto_pb.ReEncryptRequest(
                tenant_id="t1", ciphertext=sealed, aad=b"a", destination_key_id=other_tenant_key.key_id
            )
        ),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_KEY_NOT_FOUND",
    )
