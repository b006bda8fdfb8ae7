"""Several server processes on one MongoDB and Redis, as the platform runs them."""

from __future__ import annotations

import base64
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import Launch, every_version
from tests.reliability.conftest import Replica
from tests.servers import MongoServer, RedisServer
from tests.waiting import eventually


@pytest.fixture
def replicas(launch: Launch, mongo_server: MongoServer, redis_server: RedisServer) -> Iterator[list[Replica]]:
    env = {
        "MONGODB_URI": mongo_server.uri,
        "MONGODB_DATABASE": f"replicas{os.getpid()}_{time.monotonic_ns()}",
        "REDIS_URL": redis_server.url,
        "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    servers = [Replica(launch(**env)) for _ in range(2)]
    yield servers
    for server in servers:
        server.channel.close()


def test_a_rotation_storm_across_two_replicas_gives_each_version_once(replicas: list[Replica]) -> None:
    a, b = replicas
    key = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    start = threading.Barrier(10)

    def rotate(replica: Replica) -> None:
        start.wait()
        for _ in range(5):
            replica.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id), timeout=30)

    with ThreadPoolExecutor(10) as pool:
        for outcome in [pool.submit(rotate, replica) for replica in [a, b] * 5]:
            outcome.result()
    for replica in replicas:
        got = replica.keys.GetKey(key_pb.GetKeyRequest(tenant_id="acme", key_id=key.key_id)).key
        assert got.primary_version == 51
        assert [v.version for v in every_version(replica.keys, "acme", key.key_id)] == list(range(1, 52))
    eventually(lambda: b.encrypt(key.key_id).key_version == 51, timeout_s=1.0, what="version 51 on the other replica")


def test_a_rotation_on_one_replica_reaches_the_other_within_a_second(replicas: list[Replica]) -> None:
    a, b = replicas
    key = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    assert b.encrypt(key.key_id).key_version == 1  # b now holds version 1 in memory
    a.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id))
    eventually(lambda: b.encrypt(key.key_id).key_version == 2, timeout_s=1.0, what="the rotation on the other replica")


def test_disabling_on_one_replica_stops_the_other_within_a_second(replicas: list[Replica]) -> None:
    a, b = replicas
    key = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    sealed = b.encrypt(key.key_id).ciphertext
    a.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="acme", key_id=key.key_id))

    def refused() -> bool:
        try:
            b.encrypt(key.key_id)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.FAILED_PRECONDITION
        return False

    eventually(refused, timeout_s=1.0, what="the other replica refusing the disabled key")
    with pytest.raises(grpc.RpcError) as caught:
        b.crypto.Decrypt(crypto_pb.DecryptRequest(tenant_id="acme", ciphertext=sealed))
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    a.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id="acme", key_id=key.key_id))
    eventually(lambda: not refused(), timeout_s=1.0, what="the other replica serving the enabled key")


def test_disabling_a_master_key_on_one_replica_stops_the_tenant_on_the_other(replicas: list[Replica]) -> None:
    a, b = replicas
    key = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    b.encrypt(key.key_id)
    master = a.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_MASTER)).keys[0]
    a.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="acme", key_id=master.key_id))

    def refused() -> bool:
        try:
            b.encrypt(key.key_id)
        except grpc.RpcError as error:
            return error.code() == grpc.StatusCode.FAILED_PRECONDITION
        return False

    eventually(refused, timeout_s=1.0, what="the other replica refusing the tenant")
