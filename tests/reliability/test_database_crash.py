"""A key the service confirmed survives a crash of the database (found by `make chaos`).

MongoDB acknowledges a plain write before it reaches its journal; killed at the wrong moment, it forgets the
last acknowledged writes — for a key service, confirmed keys and every ciphertext made with them. Keys are
written with w=majority, j=true, so an acknowledgement means the write is on disk.
"""

from __future__ import annotations

import threading

import grpc

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.reliability.conftest import StartReplicas
from tests.servers import MongoServer
from tests.waiting import eventually


def test_keys_confirmed_just_before_the_database_is_killed_are_still_there(
    start_replicas: StartReplicas, own_mongo: MongoServer
) -> None:
    (replica,) = start_replicas(1)
    confirmed: list[str] = []
    stop = threading.Event()

    def create_keys() -> None:
        request = key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)
        while not stop.is_set():
            try:
                confirmed.append(replica.keys.CreateKey(request, timeout=5).key.key_id)
            except grpc.RpcError:
                stop.wait(0.01)  # a refused call: pace the retries against the real server process

    writer = threading.Thread(target=create_keys)
    writer.start()
    eventually(lambda: len(confirmed) >= 100, timeout_s=30.0, what="100 confirmed keys", interval_s=0.01)
    own_mongo.kill()  # SIGKILL mid-stream of writes
    stop.set()
    writer.join()
    own_mongo.start()

    def outcome(key_id: str) -> str:
        try:
            replica.keys.GetKey(key_pb.GetKeyRequest(tenant_id="acme", key_id=key_id), timeout=10)
        except grpc.RpcError as error:
            return str(error.code().name)
        return "OK"

    # Until the replica has reconnected (its store circuit fails calls fast meanwhile), UNAVAILABLE says nothing
    # about what the database kept.
    eventually(lambda: outcome(confirmed[0]) != "UNAVAILABLE", timeout_s=30.0, what="the replica reconnected")
    lost = [(key_id, found) for key_id in confirmed if (found := outcome(key_id)) != "OK"]
    assert not lost, f"{len(lost)} of {len(confirmed)} confirmed keys were lost"
