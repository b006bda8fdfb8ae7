"""The key hierarchy: root key -> one master key per tenant -> data and session keys."""

from __future__ import annotations

import threading
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import BACKENDS, ServerHandle, expect_error


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """One store unless a test names more: the hierarchy's rules are the service's, and each store's part (one
    master key per tenant, states, versions) is proven on every store by tests/storage/test_contract.py. A race for
    the first master key (the store's atomicity, the root key's unwrapping under load) and a master key rotation
    (a new version wrapped by the root key, in a file or an HSM) run on every backend."""
    name: str = getattr(request, "param", "embedded")
    return name


def _masters(server: ServerHandle, tenant: str) -> list[resources_pb2.Key]:
    request = key_pb.ListKeysRequest(tenant_id=tenant, key_type=resources_pb2.KEY_TYPE_MASTER)
    return list(server.keys.ListKeys(request).keys)


def test_the_first_data_key_creates_the_tenants_master_key(server: ServerHandle) -> None:
    assert _masters(server, "t1") == []
    server.create_key("t1")
    server.create_key("t1", resources_pb2.KEY_TYPE_SESSION)
    (master,) = _masters(server, "t1")
    assert master.state == resources_pb2.KEY_STATE_ENABLED
    assert not master.HasField("expires_at"), "a master key created on first use never expires"


def test_a_second_master_key_is_already_exists(server: ServerHandle) -> None:
    server.create_key("t1")
    (master,) = _masters(server, "t1")
    error = expect_error(
        lambda: server.create_key("t1", resources_pb2.KEY_TYPE_MASTER),
        grpc.StatusCode.ALREADY_EXISTS,
        "ERROR_REASON_MASTER_KEY_EXISTS",
    )
    assert master.key_id in (error.details() or "")


def test_an_explicit_master_key_takes_the_callers_settings(server: ServerHandle) -> None:
    master = server.create_key(
        "t1", resources_pb2.KEY_TYPE_MASTER, expire_after=Duration(seconds=86400), labels={"owner": "sec"}
    )
    assert master.expires_at.ToDatetime() - master.created_at.ToDatetime() == timedelta(days=1)
    data = server.create_key("t1")
    assert _masters(server, "t1")[0].key_id == master.key_id
    assert server.decrypt("t1", server.encrypt("t1", data.key_id, b"x").ciphertext).plaintext == b"x"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_concurrent_first_use_creates_exactly_one_master_key(server: ServerHandle) -> None:
    barrier = threading.Barrier(8)
    created: list[str] = []

    def create() -> None:
        barrier.wait()
        created.append(server.create_key("t-race").key_id)

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(created) == 8
    assert len(_masters(server, "t-race")) == 1
    for key_id in created:
        server.encrypt("t-race", key_id, b"usable")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_rotating_the_master_key_keeps_every_existing_key_working(server: ServerHandle) -> None:
    before = server.create_key("t1")
    sealed = server.encrypt("t1", before.key_id, b"old").ciphertext
    (master,) = _masters(server, "t1")
    rotated = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=master.key_id)).key
    assert rotated.primary_version == 2
    after = server.create_key("t1")
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=before.key_id))
    assert server.decrypt("t1", sealed).plaintext == b"old"
    for key in (before, after):
        assert server.decrypt("t1", server.encrypt("t1", key.key_id, b"new").ciphertext).plaintext == b"new"


def test_disabling_the_master_key_stops_the_whole_tenant_until_enabled(server: ServerHandle) -> None:
    data = server.create_key("t1")
    sealed = server.encrypt("t1", data.key_id, b"x").ciphertext
    other_tenant = server.create_key("t2")
    (master,) = _masters(server, "t1")
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=master.key_id))
    for call in (
        lambda: server.encrypt("t1", data.key_id, b"x"),
        lambda: server.decrypt("t1", sealed),
        lambda: server.create_key("t1"),
        lambda: server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=data.key_id)),
    ):
        expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_MASTER_KEY_UNAVAILABLE")
    server.encrypt("t2", other_tenant.key_id, b"unaffected")
    server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id="t1", key_id=master.key_id))
    assert server.decrypt("t1", sealed).plaintext == b"x"


def test_an_expired_master_key_stops_new_keys_but_not_existing_data(server: ServerHandle) -> None:
    master = server.create_key("t1", resources_pb2.KEY_TYPE_MASTER, expire_after=Duration(seconds=3600))
    data = server.create_key("t1")
    sealed = server.encrypt("t1", data.key_id, b"x").ciphertext
    server.clock.advance(timedelta(hours=1))
    expect_error(
        lambda: server.create_key("t1"), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_MASTER_KEY_UNAVAILABLE"
    )
    assert server.decrypt("t1", sealed).plaintext == b"x"
    server.encrypt("t1", data.key_id, b"data key itself is still valid")
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=master.key_id))
    server.create_key("t1")
