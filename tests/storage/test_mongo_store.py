"""The MongoDB store and the Redis cache against real servers: schema, secrets at rest, concurrency."""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

import pytest
from bson.raw_bson import RawBSONDocument
from pymongo.database import Database

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain.keys import KeyVersion
from crypto_server.service.key_versions import with_every_version
from crypto_server.storage.mongo import MongoKeyStore
from crypto_server.storage.port import DuplicateMasterKey, VersionRef
from tests.conftest import ServerHandle
from tests.servers import MongoServer, RedisServer
from tests.unwrap import unwrapped_material


@pytest.fixture
def backend() -> str:
    return "mongo+redis"


def _database(server: ServerHandle, mongo_server: MongoServer) -> Database[dict[str, Any]]:
    return mongo_server.client()[server.settings.mongodb_database]


def test_indexes_are_created_at_startup(server: ServerHandle, mongo_server: MongoServer) -> None:
    db = _database(server, mongo_server)
    keys = db["keys"].index_information()
    versions = db["key_versions"].index_information()
    assert keys["one_master_key_per_tenant"]["unique"]
    assert keys["one_master_key_per_tenant"]["partialFilterExpression"] == {"key_type": "MASTER"}
    assert keys["keys_by_tenant_created"]["key"] == [("tenant_id", 1), ("created_at", 1), ("_id", 1)]
    assert versions["one_version_per_number"]["unique"]
    assert versions["one_version_per_number"]["key"] == [("key_id", 1), ("version", 1)]


def test_the_first_version_is_in_the_key_document_and_rotations_are_separate_documents(
    server: ServerHandle, mongo_server: MongoServer
) -> None:
    key = server.create_key("t1")
    for _ in range(3):
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    db = _database(server, mongo_server)
    document = db["keys"].find_one({"_id": key.key_id})
    assert document is not None
    assert [v["version"] for v in document["versions"]] == [1], "creating a key is one write"
    assert document["primary_version"] == 4
    assert sorted(v["version"] for v in db["key_versions"].find({"key_id": key.key_id})) == [2, 3, 4]


def test_no_mongo_document_or_redis_value_holds_an_unwrapped_key(
    server: ServerHandle, mongo_server: MongoServer, redis_server: RedisServer
) -> None:
    created = [server.create_key(t, kt) for t in ("t1", "t2") for kt in (resources_pb2.KEY_TYPE_DATA, 3)]
    for key in created:
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=key.tenant_id, key_id=key.key_id))
        server.encrypt(key.tenant_id, key.key_id, b"use")
        server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=key.tenant_id, key_id=key.key_id))
    masters = [server.running.store.get_master_key(t) for t in ("t1", "t2")]
    stored = [server.running.store.get_key(k.tenant_id, k.key_id) for k in created]
    secrets = [m for key in [*stored, *masters] if key is not None for m in unwrapped_material(server, key)]
    assert len(secrets) == 2 * len(created) + 2
    db = _database(server, mongo_server)
    blobs = [repr(doc).encode() for name in db.list_collection_names() for doc in db[name].find()]
    blobs += [bytes(value) for value in _raw_bson(db)]
    redis = redis_server.client()
    names = list(redis.scan_iter(match=f"caas:crypto:mongo:{server.settings.mongodb_database}:*"))
    assert names, "the Redis cache holds no key: the test would prove nothing"
    for name in names:
        if redis.type(name) == b"hash":
            blobs += list(redis.hgetall(name).values())
    for secret in secrets:
        for encoding in (secret, base64.b64encode(secret), secret.hex().encode()):
            assert not any(encoding in blob for blob in blobs)


def _raw_bson(db: Database[dict[str, Any]]) -> list[bytes]:
    """Every document's raw BSON bytes, as stored."""
    options = db.codec_options.with_options(document_class=RawBSONDocument)
    raw_db: Database[RawBSONDocument] = db.client.get_database(db.name, codec_options=options)  # type: ignore[assignment]
    return [bytes(doc.raw) for name in raw_db.list_collection_names() for doc in raw_db[name].find()]


def test_two_stores_racing_for_the_same_version_let_exactly_one_win(
    server: ServerHandle, mongo_server: MongoServer
) -> None:
    key = server.create_key("t1")
    stores = [MongoKeyStore(mongo_server.uri, server.settings.mongodb_database) for _ in range(2)]
    try:
        stored = stores[0].get_key("t1", key.key_id)
        assert stored is not None
        candidate = KeyVersion(
            version=2,
            created_at=stored.created_at + timedelta(seconds=1),
            expires_at=None,
            parent_version=1,
            wrapped_material=b"\0" * 60,
        )
        barrier = threading.Barrier(2)
        results: list[bool] = []

        def race(store: MongoKeyStore) -> None:
            barrier.wait()
            results.append(store.add_version(stored.with_new_primary(candidate), stored.revision))

        threads = [threading.Thread(target=race, args=(s,)) for s in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(results) == [False, True]
        after = stores[1].get_key("t1", key.key_id)
        assert after is not None
        assert [v.version for v in stores[1].list_versions("t1", key.key_id, 0, 10)] == [1, 2]
        assert after.primary_version == 2
    finally:
        for store in stores:
            store.close()


def test_a_tenant_can_never_get_two_master_keys(server: ServerHandle, mongo_server: MongoServer) -> None:
    server.create_key("t1")
    store = MongoKeyStore(mongo_server.uri, server.settings.mongodb_database)
    try:
        master = store.get_master_key("t1")
        assert master is not None
        with pytest.raises(DuplicateMasterKey):
            store.insert_key(replace(master, key_id="00000000-0000-4000-8000-000000000001"))
        db = _database(server, mongo_server)
        assert db["key_versions"].count_documents({"key_id": "00000000-0000-4000-8000-000000000001"}) == 0
    finally:
        store.close()


def test_timestamps_round_trip_exactly(server: ServerHandle) -> None:
    key = server.create_key("t1")
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key.key_id)).key
    assert got == key
    assert key.created_at.nanos % 1_000_000 == 0


class _ReservingAfterReads:
    """The store's `keys` collection, with another server's reservation landing right after each find_one:
    between a read-then-write's read and its write."""

    def __init__(self, real: Any, reserve: Callable[[], object]) -> None:
        self._real = real
        self._reserve = reserve

    def find_one(self, *args: Any, **kwargs: Any) -> Any:
        found = self._real.find_one(*args, **kwargs)
        self._reserve()
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_erasing_or_rewrapping_an_embedded_version_keeps_the_counts_reserved_meanwhile(
    server: ServerHandle, mongo_server: MongoServer
) -> None:
    """The defect: both writes put the key document's `versions` array back whole, as they had read it, so a
    reservation made in between was lost — and a stored count below the uses reserved lets the version pass
    its hard limit."""
    key = server.create_key("t1")
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    writer, other = (MongoKeyStore(mongo_server.uri, server.settings.mongodb_database) for _ in range(2))
    first = VersionRef("t1", key.key_id, 1)
    try:
        read = writer.get_key("t1", key.key_id)
        assert read is not None
        stored = with_every_version(writer, read)
        writer._keys = _ReservingAfterReads(writer._keys, lambda: other.reserve_encryptions(first, 10, 1000))  # type: ignore[assignment]

        old = stored.versions[0].wrapped_material
        assert writer.replace_wrapped_material("t1", key.key_id, 1, old, b"\1" * 60)
        read_again = other.get_key("t1", key.key_id)
        assert read_again is not None
        rewrapped = with_every_version(other, read_again)
        assert rewrapped.versions[0].wrapped_material == b"\1" * 60
        assert rewrapped.versions[0].encryptions == 10

        erased = replace(rewrapped.versions[0], wrapped_material=b"", destroyed_at=rewrapped.created_at)
        assert writer.update_version_states(
            replace(rewrapped, versions=(erased, *rewrapped.versions[1:])), rewrapped.revision
        )
        after = other.get_key("t1", key.key_id)
        assert after is not None and after.versions[0].destroyed and after.versions[0].wrapped_material == b""
        assert after.versions[0].encryptions == 20, "both reservations made during the writes are kept"
    finally:
        writer.close()
        other.close()
