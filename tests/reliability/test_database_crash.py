"""A key the service confirmed survives a crash of the database (found by `make chaos`).

MongoDB acknowledges a plain write before it reaches its journal; killed at the wrong moment, it forgets the
last acknowledged writes — for a key service, confirmed keys and every ciphertext made with them. Keys are
written with w=majority, j=true, so an acknowledgement means the write is on disk.
"""

from __future__ import annotations

import threading
import time

import grpc

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.reliability.conftest import StartReplicas, within
from tests.servers import MongoServer


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
                time.sleep(0.01)

    writer = threading.Thread(target=create_keys)
    writer.start()
    within(30.0, lambda: len(confirmed) >= 100, step_s=0.01)
    own_mongo.kill()  # SIGKILL mid-stream of writes
    stop.set()
    writer.join()
    own_mongo.start()
    lost = []
    for key_id in confirmed:
        request = key_pb.GetKeyRequest(tenant_id="acme", key_id=key_id)
        try:
            replica.keys.GetKey(request, timeout=10)
        except grpc.RpcError as error:
            lost.append((key_id, error.code().name))
    assert not lost, f"{len(lost)} of {len(confirmed)} confirmed keys were lost"
