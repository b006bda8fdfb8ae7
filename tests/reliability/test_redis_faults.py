"""Redis stalls and outages never leave a key in an older state than the store (issue 10, defects 1 and 2).

The faults are real: the Redis process is frozen with SIGSTOP (a stall: sockets open, no answers) and thawed
with SIGCONT, while crypto-server replicas on a real MongoDB-protocol server keep working.
"""

from __future__ import annotations

import grpc

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.reliability.conftest import StartReplicas
from tests.servers import RedisServer
from tests.waiting import eventually


def _refused(replica_encrypt: object) -> bool:
    try:
        replica_encrypt()  # type: ignore[operator]
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.FAILED_PRECONDITION
    return False


def test_rotations_during_a_redis_stall_take_effect_and_later_rotations_still_work(
    start_replicas: StartReplicas, own_redis: RedisServer
) -> None:
    (a,) = start_replicas(1)
    key = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    a.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id))  # v2, cached in Redis
    with own_redis.frozen():
        for expected in (3, 4):
            rotated = a.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id), timeout=10)
            assert rotated.key.primary_version == expected
    # Until its Redis back-off runs out the server reads from the store; then it uses Redis again (and says
    # so), and a read could meet Redis's copy from before the stall. Every read, before and after, is checked.

    def read_checked_and_redis_resumed() -> bool:
        got = a.keys.GetKey(key_pb.GetKeyRequest(tenant_id="acme", key_id=key.key_id), timeout=5).key
        assert got.primary_version == 4, "Redis's copy from before the stall is never served"
        return any(line.get("msg") == "redis reachable again; caching resumed" for line in a.process.logs())

    eventually(read_checked_and_redis_resumed, timeout_s=10.0, what="the server using Redis again", interval_s=0.1)
    read_checked_and_redis_resumed()
    assert a.encrypt(key.key_id).key_version == 4
    again = a.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id), timeout=10)
    assert again.key.primary_version == 5, "rotations keep taking effect"


def test_a_disable_whose_invalidation_was_lost_in_a_redis_stall_reaches_the_other_replica(
    start_replicas: StartReplicas, own_redis: RedisServer
) -> None:
    a, b = start_replicas(2)
    key = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    assert b.encrypt(key.key_id).key_version == 1  # b holds the key in memory
    with own_redis.frozen():
        a.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="acme", key_id=key.key_id), timeout=10)
        # The publish to b is lost in the stall; b must still learn of it within the stated bound.
    eventually(lambda: _refused(lambda: b.encrypt(key.key_id)), timeout_s=3.0, what="the other replica refusing")


def test_a_rotation_during_a_redis_outage_reaches_the_other_replica(
    start_replicas: StartReplicas, own_redis: RedisServer
) -> None:
    a, b = start_replicas(2)
    key = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    assert b.encrypt(key.key_id).key_version == 1
    own_redis.kill()
    try:
        a.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id), timeout=10)
        eventually(lambda: b.encrypt(key.key_id).key_version == 2, timeout_s=3.0, what="v2 during the outage")
    finally:
        own_redis.start()
    eventually(lambda: b.encrypt(key.key_id).key_version == 2, timeout_s=3.0, what="v2 after the outage")
