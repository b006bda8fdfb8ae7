"""Acceptance 1: create -> encrypt -> decrypt for each key type where it applies."""

from __future__ import annotations

import uuid

import grpc
import pytest

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import BACKENDS, ServerHandle, StartServer, expect_error

MIB = 1024 * 1024


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The round trip runs on every backend (each store, a file or an HSM root key); the limits and the master
    key's refusal are the service's and run on one store."""
    name: str = getattr(request, "param", "embedded")
    return name


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("key_type", [resources_pb2.KEY_TYPE_DATA, resources_pb2.KEY_TYPE_SESSION])
def test_encrypt_then_decrypt_returns_the_plaintext(server: ServerHandle, key_type: int) -> None:
    key = server.create_key("tenant-a", key_type)
    assert uuid.UUID(key.key_id)
    sealed = server.encrypt("tenant-a", key.key_id, b"hello world", aad=b"conversation-1")
    assert sealed.key_id == key.key_id
    assert sealed.key_version == 1
    assert b"hello world" not in sealed.ciphertext
    opened = server.decrypt("tenant-a", sealed.ciphertext, aad=b"conversation-1")
    assert opened.plaintext == b"hello world"
    assert (opened.key_id, opened.key_version) == (key.key_id, 1)


def test_master_key_refuses_to_encrypt(server: ServerHandle) -> None:
    server.create_key("tenant-a")
    listed = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="tenant-a", key_type=resources_pb2.KEY_TYPE_MASTER))
    (master,) = listed.keys
    error = expect_error(
        lambda: server.encrypt("tenant-a", master.key_id, b"x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_TYPE_MISMATCH",
    )
    assert "master key" in (error.details() or "")


def test_empty_plaintext_round_trips(server: ServerHandle) -> None:
    key = server.create_key("tenant-a")
    sealed = server.encrypt("tenant-a", key.key_id, b"")
    assert server.decrypt("tenant-a", sealed.ciphertext).plaintext == b""


def test_one_mebibyte_round_trips(server: ServerHandle) -> None:
    key = server.create_key("tenant-a")
    plaintext = bytes(range(256)) * (MIB // 256)
    sealed = server.encrypt("tenant-a", key.key_id, plaintext)
    assert server.decrypt("tenant-a", sealed.ciphertext).plaintext == plaintext


def test_plaintext_over_the_limit_is_invalid_argument(server: ServerHandle) -> None:
    key = server.create_key("tenant-a")
    error = expect_error(
        lambda: server.encrypt("tenant-a", key.key_id, b"\0" * (MIB + 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "plaintext",
    )
    assert str(MIB) in (error.details() or "")


def test_the_plaintext_limit_is_configurable(start_server: StartServer) -> None:
    server = start_server(max_plaintext_bytes=100)
    key = server.create_key("tenant-a")
    server.encrypt("tenant-a", key.key_id, b"\0" * 100)
    expect_error(
        lambda: server.encrypt("tenant-a", key.key_id, b"\0" * 101),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "plaintext",
    )


def test_each_encryption_uses_a_fresh_nonce(server: ServerHandle) -> None:
    key = server.create_key("tenant-a")
    ciphertexts = {server.encrypt("tenant-a", key.key_id, b"same").ciphertext for _ in range(50)}
    assert len(ciphertexts) == 50
