"""A ciphertext or MAC made with a version another replica just created opens here at once, before this
replica has heard of the rotation (found by `make chaos`: it failed DECRYPTION_FAILED, which no caller retries).

Made deterministic: Redis is frozen (no pub/sub) and this replica polls for changes only every 60 s, so its
memory holds the key at the old version for the whole test.
"""

from __future__ import annotations

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.reliability.conftest import StartReplicas
from tests.servers import RedisServer


def test_a_version_created_elsewhere_decrypts_and_verifies_before_the_change_arrives(
    start_replicas: StartReplicas, own_redis: RedisServer
) -> None:
    (a,) = start_replicas(1)
    (b,) = start_replicas(1, CRYPTO_INVALIDATION_INTERVAL="60")
    data = a.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
    mac_key = a.keys.CreateKey(
        key_pb.CreateKeyRequest(
            tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA, algorithm=resources_pb2.ALGORITHM_HMAC_SHA256
        )
    ).key
    assert b.encrypt(data.key_id).key_version == 1  # b holds both keys at version 1
    b.crypto.ComputeMac(crypto_pb.ComputeMacRequest(tenant_id="acme", key_id=mac_key.key_id, data=b"d"))
    with own_redis.frozen():
        for key in (data, mac_key):
            a.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id), timeout=10)
        sealed = a.encrypt(data.key_id)
        mac = a.crypto.ComputeMac(crypto_pb.ComputeMacRequest(tenant_id="acme", key_id=mac_key.key_id, data=b"d"))
        assert (sealed.key_version, mac.key_version) == (2, 2)

        opened = b.crypto.Decrypt(crypto_pb.DecryptRequest(tenant_id="acme", ciphertext=sealed.ciphertext), timeout=5)
        assert opened.plaintext == b"x" and opened.key_version == 2
        verified = b.crypto.VerifyMac(
            crypto_pb.VerifyMacRequest(tenant_id="acme", key_id=mac_key.key_id, data=b"d", mac=mac.mac, key_version=2),
            timeout=5,
        )
        assert verified.valid
