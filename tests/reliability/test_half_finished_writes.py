"""Writes that stopped half-way on MongoDB (a replica killed between two writes) are finished, never refused
forever and never reported done while they are not (issue 10, defects 3 and 4).

The crash is reproduced exactly: the documents a killed writer leaves behind are written into the real
MongoDB-protocol server, then the service is asked to carry on.
"""

from __future__ import annotations

import os
from typing import Any

import grpc
import pytest
import redis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pymongo.database import Database

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain.key_wrap import WrappingContext, wrap_key
from crypto_server.domain.keys import KeyVersion
from crypto_server.storage.mongo import MongoKeyStore
from tests.conftest import ServerHandle, expect_error
from tests.servers import MongoServer
from tests.unwrap import unwrapped_material


@pytest.fixture(params=["mongo", "mongo+redis"])
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _database(server: ServerHandle, mongo_server: MongoServer) -> Database[dict[str, Any]]:
    return mongo_server.client()[server.settings.mongodb_database]


def _leave_pending_version(server: ServerHandle, mongo_server: MongoServer, key_id: str, request_id: str) -> bytes:
    """What a RotateKey killed between its two writes leaves: version n+1 in key_versions, the primary still n.
    Returns the pending version's material."""
    store = server.running.store
    key = store.get_key("t1", key_id)
    master = store.get_master_key("t1")
    assert key is not None and master is not None
    master_material = unwrapped_material(server, master)[master.primary_version - 1]
    material = os.urandom(32)
    number = key.latest_version + 1
    context = WrappingContext("t1", key_id, key.key_type.value, number, master.primary_version, key.algorithm.value)
    wrapped = wrap_key(AESGCM(master_material), material, context)
    pending = KeyVersion(number, key.created_at, None, master.primary_version, wrapped, request_id)
    _database(server, mongo_server)["key_versions"].insert_one(MongoKeyStore._version_document(key_id, pending))
    return material


def test_a_retried_rotation_whose_version_was_left_pending_finishes_it(
    server: ServerHandle, mongo_server: MongoServer
) -> None:
    key = server.create_key("t1")
    material = _leave_pending_version(server, mongo_server, key.key_id, "rotate-7")
    retried = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id="rotate-7"))
    assert retried.key.primary_version == 2, "the retry finishes the rotation it names, not reports the old state"
    assert [v.version for v in server.versions("t1", key.key_id)] == [1, 2]
    assert server.encrypt("t1", key.key_id, b"x").key_version == 2
    stored = server.running.store.get_key("t1", key.key_id)
    assert stored is not None
    assert unwrapped_material(server, stored)[1] == material, "the pending version itself became primary"
    again = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id="rotate-7"))
    assert again.key.primary_version == 2, "and a further retry adds nothing"


def test_a_new_rotation_finishes_a_pending_version_then_adds_its_own(
    server: ServerHandle, mongo_server: MongoServer
) -> None:
    key = server.create_key("t1")
    _leave_pending_version(server, mongo_server, key.key_id, "crashed")
    rotated = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    assert rotated.key.primary_version == 3
    assert [v.version for v in server.versions("t1", key.key_id)] == [1, 2, 3], "versions stay consecutive, each once"
    crashed = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id="crashed"))
    assert crashed.key.primary_version == 3, "the crashed request's version exists; its retry adds nothing"


def test_a_pending_version_that_does_not_unwrap_is_never_made_primary(
    server: ServerHandle, mongo_server: MongoServer
) -> None:
    key = server.create_key("t1")
    stored = server.running.store.get_key("t1", key.key_id)
    assert stored is not None
    forged = KeyVersion(2, stored.created_at, None, 1, b"\0" * 60, None)
    _database(server, mongo_server)["key_versions"].insert_one(MongoKeyStore._version_document(key.key_id, forged))
    expect_error(
        lambda: server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id)),
        grpc.StatusCode.DATA_LOSS,
        "ERROR_REASON_KEY_INTEGRITY",
    )
    assert server.encrypt("t1", key.key_id, b"x").key_version == 1


def test_a_create_retried_after_a_crash_that_left_version_documents_creates_the_key(
    server: ServerHandle, mongo_server: MongoServer
) -> None:
    """Before creation was one write, a crash left version documents with no key document, and every retry
    of the request was refused ABORTED. Such leftovers no longer block the retry, and are removed."""
    request = key_pb.CreateKeyRequest(tenant_id="t1", key_type=resources_pb2.KEY_TYPE_DATA, request_id="create-3")
    first = server.keys.CreateKey(request).key
    db = _database(server, mongo_server)
    document = db["keys"].find_one({"_id": first.key_id})
    assert document is not None
    # The leftover of an old-style crashed creation: its version document, and no key document.
    db["key_versions"].insert_one({"key_id": first.key_id, **document["versions"][0]})
    db["keys"].delete_one({"_id": first.key_id})
    server.running.keyring.forget_all()
    if server.settings.redis_url:
        redis.Redis.from_url(server.settings.redis_url, db=2).flushdb()

    retried = server.keys.CreateKey(request).key
    assert retried.key_id == first.key_id
    assert server.encrypt("t1", retried.key_id, b"x").key_version == 1
    assert db["key_versions"].count_documents({"key_id": first.key_id}) == 0, "the leftover is cleaned up"
    assert server.keys.CreateKey(request).key.key_id == first.key_id
