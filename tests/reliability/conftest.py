"""Fault tests: replicas of one deployment on the test's own Redis and MongoDB-protocol servers (`own_redis`,
`own_mongo`), which the tests freeze and kill."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator

import grpc
import pytest

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc
from tests.conftest import Launch
from tests.servers import CryptoServerProcess, MongoServer, RedisServer


class Replica:
    """A `python -m crypto_server` process and stubs to call it."""

    def __init__(self, process: CryptoServerProcess) -> None:
        self.process = process
        self.channel = grpc.insecure_channel(process.address)
        self.keys = key_service_pb2_grpc.KeyServiceStub(self.channel)
        self.crypto = crypto_service_pb2_grpc.CryptoServiceStub(self.channel)

    def encrypt(self, key_id: str, tenant_id: str = "acme") -> crypto_pb.EncryptResponse:
        return self.crypto.Encrypt(
            crypto_pb.EncryptRequest(tenant_id=tenant_id, key_id=key_id, plaintext=b"x"), timeout=5
        )

    def close(self) -> None:
        self.channel.close()


StartReplicas = Callable[..., list[Replica]]


@pytest.fixture
def start_replicas(launch: Launch, own_mongo: MongoServer, own_redis: RedisServer) -> Iterator[StartReplicas]:
    """Replicas of one deployment: one MongoDB database, one Redis, one root key."""
    opened: list[Replica] = []
    env = {
        "MONGODB_URI": own_mongo.uri,
        "MONGODB_DATABASE": f"faults{os.getpid()}_{time.monotonic_ns()}",
        "REDIS_URL": own_redis.url,
        "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }

    def start(count: int = 2, **extra: str) -> list[Replica]:
        replicas = [Replica(launch(**env, **extra)) for _ in range(count)]
        opened.extend(replicas)
        return replicas

    yield start
    for replica in opened:
        replica.close()
