"""Fault tests: Redis or MongoDB goes away under load; nothing is lost and recovery is automatic.

Each test owns its Redis and MongoDB processes (so it may stop them), on 127.0.0.1 only. Each asks for them before
`start_server`: fixtures are torn down in the reverse order, so the server stops while its stores still run (else
every stop waits out the store's timeouts, seconds each).
"""

from __future__ import annotations

import logging
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, StartServer, error_info
from tests.servers import MongoServer, RedisServer
from tests.waiting import eventually


@pytest.fixture
def backend() -> str:
    return "embedded"  # the tests below configure their own MongoDB and Redis


def _key_service_health(server: ServerHandle) -> int:
    stub = health_pb2_grpc.HealthStub(server.channel)
    status: int = stub.Check(health_pb2.HealthCheckRequest(service="caas.crypto.v1.KeyService"), timeout=2).status
    return status


def test_redis_going_away_during_encryption_fails_no_call_and_caching_resumes(
    own_redis: RedisServer, own_mongo: MongoServer, start_server: StartServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A keyring TTL of 0 sends every call through Redis, so the outage is felt on every call.
    server = start_server(
        mongodb_uri=own_mongo.uri, mongodb_database="degrade", redis_url=own_redis.url, keyring_ttl_s=0.0
    )
    key = server.create_key("t1")
    redis_entry = f"caas:crypto:mongo:degrade:key:t1:{key.key_id}"
    server.encrypt("t1", key.key_id, b"warm")
    assert own_redis.client().exists(redis_entry)
    caplog.set_level(logging.WARNING, logger="crypto_server.storage.redis")
    failures = 0
    calls = 0
    for round_number in range(300):
        if round_number == 100:
            own_redis.stop()
        if round_number == 150:
            server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id), timeout=5)
        try:
            sealed = server.encrypt("t1", key.key_id, b"payload %d" % round_number)
            assert server.decrypt("t1", sealed.ciphertext).plaintext == b"payload %d" % round_number
        except grpc.RpcError:
            failures += 1
        calls += 1
    assert calls == 300
    assert failures == 0
    assert server.encrypt("t1", key.key_id, b"x").key_version == 2
    outage_warnings = [r for r in caplog.records if r.getMessage().startswith("redis unavailable")]
    assert len(outage_warnings) == 1, "a Redis outage is logged once per interval, not once per request"
    own_redis.start()
    eventually(
        lambda: _encrypt_and_check_cached(server, key.key_id, own_redis, redis_entry),
        timeout_s=10,
        what="caching in the restarted Redis",
    )


def _encrypt_and_check_cached(server: ServerHandle, key_id: str, redis: RedisServer, entry: str) -> bool:
    server.encrypt("t1", key_id, b"after")
    return bool(redis.client().exists(entry))


def test_mongo_going_away_keeps_cached_keys_working_and_refuses_writes_in_time(
    own_mongo: MongoServer, start_server: StartServer
) -> None:
    server = start_server(
        mongodb_uri=own_mongo.uri, mongodb_database="outage", store_timeout_s=1.0, health_interval_s=0.2
    )
    key = server.create_key("t1")
    sealed = server.encrypt("t1", key.key_id, b"before").ciphertext
    assert _key_service_health(server) == health_pb2.HealthCheckResponse.SERVING
    own_mongo.stop()
    for round_number in range(50):
        fresh = server.encrypt("t1", key.key_id, b"during %d" % round_number).ciphertext
        assert server.decrypt("t1", fresh).plaintext == b"during %d" % round_number
    assert server.decrypt("t1", sealed).plaintext == b"before"
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        server.create_key("t1")
    assert time.monotonic() - started < 3.0
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    # The audit record of a key change is written first, to the same database: either refusal says the same.
    assert error_info(caught.value).reason in {"ERROR_REASON_STORE_UNAVAILABLE", "ERROR_REASON_AUDIT_UNAVAILABLE"}
    assert "retry" in (caught.value.details() or "")
    with pytest.raises(grpc.RpcError) as deadline_bound:
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id), timeout=0.3)
    assert deadline_bound.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    eventually(
        lambda: _key_service_health(server) == health_pb2.HealthCheckResponse.NOT_SERVING,
        timeout_s=5,
        what="KeyService NOT_SERVING while MongoDB is down",
    )
    crypto_health = health_pb2_grpc.HealthStub(server.channel).Check(
        health_pb2.HealthCheckRequest(service="caas.crypto.v1.CryptoService")
    )
    assert crypto_health.status == health_pb2.HealthCheckResponse.SERVING

    own_mongo.start()
    eventually(
        lambda: _key_service_health(server) == health_pb2.HealthCheckResponse.SERVING,
        timeout_s=10,
        what="KeyService SERVING again after MongoDB is back",
    )
    created = server.create_key("t1", resources_pb2.KEY_TYPE_SESSION)
    assert server.decrypt("t1", server.encrypt("t1", created.key_id, b"back").ciphertext).plaintext == b"back"


def test_a_key_not_refreshed_during_a_mongo_outage_is_served_from_memory(
    own_mongo: MongoServer, start_server: StartServer
) -> None:
    # Past its TTL, an entry nothing invalidated keeps serving while the store cannot answer.
    server = start_server(mongodb_uri=own_mongo.uri, mongodb_database="stale", store_timeout_s=0.5, keyring_ttl_s=0.0)
    key = server.create_key("t1")
    server.encrypt("t1", key.key_id, b"warm")
    own_mongo.stop()
    assert server.encrypt("t1", key.key_id, b"still works").key_version == 1
    own_mongo.start()  # back, so the server's shutdown (its last audit checkpoint) does not wait out timeouts
