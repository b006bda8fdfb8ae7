"""Idempotent CreateKey and RotateKey: a repeated request_id makes nothing new.

The sequential cases run on one store: the use case is proven in tests/service/test_key_lifecycle.py and each
store's part (a repeated key id refused, one version per request id) in tests/storage/test_contract.py. The
concurrent cases, where the store's atomicity is what makes one key or one version, run on every store.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, expect_error


def _keys_of(server: ServerHandle, tenant: str, key_type: int = resources_pb2.KEY_TYPE_DATA) -> list[str]:
    page = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=tenant, key_type=key_type, page_size=1000))
    return [key.key_id for key in page.keys]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_repeated_create_returns_the_first_key_and_creates_nothing(server: ServerHandle) -> None:
    first = server.create_key("t1", labels={"team": "media"}, request_id="req-1")
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=first.key_id))
    repeat = server.create_key("t1", labels={"team": "media"}, request_id="req-1")
    assert repeat.key_id == first.key_id
    assert repeat.primary_version == 2, "the repeat answers with the key as it is now"
    assert _keys_of(server, "t1") == [first.key_id]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_the_same_request_id_with_other_parameters_is_invalid_argument(server: ServerHandle) -> None:
    server.create_key("t1", request_id="req-1")
    for changed in (
        {"labels": {"team": "other"}},
        {"expire_after": Duration(seconds=3600)},
        {"key_type": resources_pb2.KEY_TYPE_SESSION},
    ):
        expect_error(
            lambda changed=changed: server.create_key("t1", **{"request_id": "req-1", **changed}),  # type: ignore[misc]
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
            "request_id",
        )


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_request_ids_are_scoped_to_the_tenant(server: ServerHandle) -> None:
    a = server.create_key("tenant-a", request_id="shared")
    b = server.create_key("tenant-b", request_id="shared")
    assert a.key_id != b.key_id


def test_concurrent_repeats_of_one_create_make_one_key(server: ServerHandle) -> None:
    server.create_key("t1")  # the master key exists, so every attempt races on the data key alone
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def create() -> None:
        barrier.wait()
        for _ in range(5):
            try:
                outcomes.append(server.create_key("t1", request_id="same").key_id)
                return
            except grpc.RpcError as error:
                # A twin still writing may answer ABORTED; the client retries.
                assert error.code() == grpc.StatusCode.ABORTED

    threads = [threading.Thread(target=create) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(outcomes) == 6
    assert len(set(outcomes)) == 1
    assert len(_keys_of(server, "t1")) == 2  # the first key and the idempotent one


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_repeated_master_key_create_is_not_already_exists(server: ServerHandle) -> None:
    master = server.create_key("t1", resources_pb2.KEY_TYPE_MASTER, request_id="m")
    assert server.create_key("t1", resources_pb2.KEY_TYPE_MASTER, request_id="m").key_id == master.key_id
    expect_error(
        lambda: server.create_key("t1", resources_pb2.KEY_TYPE_MASTER, request_id="other"),
        grpc.StatusCode.ALREADY_EXISTS,
        "ERROR_REASON_MASTER_KEY_EXISTS",
    )


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_repeated_rotation_adds_one_version(server: ServerHandle) -> None:
    key = server.create_key("t1")
    rotate = key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id="rot-1")
    assert server.keys.RotateKey(rotate).key.primary_version == 2
    assert server.keys.RotateKey(rotate).key.primary_version == 2
    other = key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id="rot-2")
    assert server.keys.RotateKey(other).key.primary_version == 3
    assert server.keys.RotateKey(rotate).key.primary_version == 3, "a late repeat changes nothing"
    assert [v.version for v in server.versions("t1", key.key_id)] == [1, 2, 3]


def test_concurrent_repeats_of_one_rotation_add_one_version(server: ServerHandle) -> None:
    key = server.create_key("t1")
    barrier = threading.Barrier(6)

    def rotate() -> None:
        barrier.wait()
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id="once"))

    threads = [threading.Thread(target=rotate) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [v.version for v in server.versions("t1", key.key_id)] == [1, 2]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)  # validated before any store is asked
@pytest.mark.parametrize("request_id", ["has space", "x" * 129, "slash/y", "ünï"])
def test_malformed_request_id_is_rejected(server: ServerHandle, request_id: str) -> None:
    key = server.create_key("t1")
    for call in (
        lambda: server.create_key("t1", request_id=request_id),
        lambda: server.keys.RotateKey(
            key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id=request_id)
        ),
    ):
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "request_id")
