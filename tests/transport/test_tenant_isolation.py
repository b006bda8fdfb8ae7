"""Acceptance 4: tenant B cannot see, use or learn of tenant A's keys."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import grpc
import pytest

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.domain.errors import DecryptionFailed
from tests.conftest import ServerHandle, expect_error


@pytest.fixture
def backend() -> str:
    """One store: the service asks the store for (tenant, key id), and every store answers None for another
    tenant's key, refuses to change it and lists only the tenant's keys, the Redis cache included
    (tests/storage/test_contract.py, test_contract_extra.py); this file checks that the RPCs answer exactly as for
    a missing key."""
    return "embedded"


def _key_calls(server: ServerHandle, tenant: str, key_id: str) -> dict[str, Callable[[], object]]:
    return {
        "GetKey": lambda: server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=tenant, key_id=key_id)),
        "RotateKey": lambda: server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=tenant, key_id=key_id)),
        "DisableKey": lambda: server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id=tenant, key_id=key_id)),
        "EnableKey": lambda: server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id=tenant, key_id=key_id)),
        "Encrypt": lambda: server.encrypt(tenant, key_id, b"x"),
        "Decrypt with key_id": lambda: server.decrypt(tenant, b"\x01" + b"\0" * 60, key_id=key_id),
    }


@pytest.mark.parametrize(
    "operation", ["GetKey", "RotateKey", "DisableKey", "EnableKey", "Encrypt", "Decrypt with key_id"]
)
def test_another_tenants_key_is_answered_exactly_as_a_missing_key(server: ServerHandle, operation: str) -> None:
    key_a = server.create_key("tenant-a")
    server.create_key("tenant-b")
    missing = str(uuid.uuid4())
    foreign = expect_error(
        _key_calls(server, "tenant-b", key_a.key_id)[operation], grpc.StatusCode.NOT_FOUND, "ERROR_REASON_KEY_NOT_FOUND"
    )
    absent = expect_error(
        _key_calls(server, "tenant-b", missing)[operation], grpc.StatusCode.NOT_FOUND, "ERROR_REASON_KEY_NOT_FOUND"
    )
    assert (foreign.details() or "").replace(key_a.key_id, "ID") == (absent.details() or "").replace(missing, "ID")
    # Tenant A's key is untouched by B's attempts.
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="tenant-a", key_id=key_a.key_id)).key
    assert got.primary_version == 1
    assert got.state == key_a.state


def test_tenant_b_cannot_decrypt_tenant_a_ciphertext(server: ServerHandle) -> None:
    key_a = server.create_key("tenant-a")
    server.create_key("tenant-b")
    ciphertext = server.encrypt("tenant-a", key_a.key_id, b"a's secret").ciphertext
    with pytest.raises(grpc.RpcError) as foreign:
        server.decrypt("tenant-b", ciphertext)
    # Exactly what B gets for a ciphertext naming a key that exists nowhere.
    unknown_key = ciphertext[:1] + uuid.uuid4().bytes + ciphertext[17:]
    with pytest.raises(grpc.RpcError) as absent:
        server.decrypt("tenant-b", unknown_key)
    assert foreign.value.code() == absent.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert foreign.value.details() == absent.value.details() == DecryptionFailed.MESSAGE
    # Naming A's key explicitly is NOT_FOUND, as for any key B does not have.
    expect_error(
        lambda: server.decrypt("tenant-b", ciphertext, key_id=key_a.key_id),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_KEY_NOT_FOUND",
    )
    assert server.decrypt("tenant-a", ciphertext).plaintext == b"a's secret"


def test_tenant_b_lists_none_of_tenant_a_keys(server: ServerHandle) -> None:
    a_ids = {server.create_key("tenant-a").key_id for _ in range(3)}
    b_ids = {server.create_key("tenant-b").key_id}
    listed = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="tenant-b", page_size=1000)).keys
    listed_ids = {key.key_id for key in listed}
    assert b_ids <= listed_ids
    assert not a_ids & listed_ids
    assert {key.tenant_id for key in listed} == {"tenant-b"}
