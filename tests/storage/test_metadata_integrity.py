"""Key metadata is authenticated: every single-field edit of a stored key, on SQLite and on MongoDB, is
detected on the next load (DATA_LOSS, a log line and a metric), never served.

The attack each test performs: someone with write access to the database edits one field — re-enables a
disabled key, rolls the primary back, drops a version, moves an expiry — and the server loads the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import sqlite3
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
import redis
from google.protobuf.field_mask_pb2 import FieldMask
from pymongo.database import Database

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.app import load_metadata_authenticator
from crypto_server.domain.errors import KeyIntegrityError
from crypto_server.domain.key_integrity import canonical_metadata
from crypto_server.service.key_versions import with_every_version
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import ServerHandle, StartServer, expect_error
from tests.servers import MongoServer

# How to load a key after an edit: (tenant, key id) as the edited row now names them.
Where = tuple[str, str]


@pytest.fixture
def prepared(server: ServerHandle) -> tuple[ServerHandle, str, str]:
    """A disabled data key with two versions (one rotation with a request id) and a label, plus its master."""
    key = server.create_key("t1", labels={"team": "messaging"})
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id, request_id="rotate-1"))
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=key.key_id))
    master = server.running.serving.get_master_key("t1")
    assert master is not None
    return server, key.key_id, master.key_id


def _load_is_refused(server: ServerHandle, where: Where) -> None:
    """Reading the key with every version (as the server does for an export or a destruction, and version by
    version for decryption: test_an_edited_version_refuses_the_decryption_that_reads_it) is refused."""
    with pytest.raises(KeyIntegrityError):
        key = server.running.serving.get_key(*where)
        assert key is not None
        with_every_version(server.running.serving, key)


# -- SQLite ---------------------------------------------------------------------------------------------------

_SQLITE_EDITS: dict[str, tuple[str, Callable[[str, str], Where]]] = {
    # name: (UPDATE statement with ? for the data key id, where the key is loaded from afterwards)
    "disabled": ("UPDATE keys SET disabled = 0 WHERE key_id = ?", lambda k, m: ("t1", k)),
    "primary_version": ("UPDATE keys SET primary_version = 1 WHERE key_id = ?", lambda k, m: ("t1", k)),
    "key_type": ("UPDATE keys SET key_type = 'SESSION' WHERE key_id = ?", lambda k, m: ("t1", k)),
    "algorithm": ("UPDATE keys SET algorithm = 'HMAC_SHA256' WHERE key_id = ?", lambda k, m: ("t1", k)),
    "created_us": ("UPDATE keys SET created_us = created_us + 1000 WHERE key_id = ?", lambda k, m: ("t1", k)),
    "expire_after_us": (
        "UPDATE keys SET expire_after_us = expire_after_us * 2 WHERE key_id = ?",
        lambda k, m: ("t1", k),
    ),
    "rotation_period_us": (
        "UPDATE keys SET rotation_period_us = rotation_period_us + 1000 WHERE key_id = ?",
        lambda k, m: ("t1", k),
    ),
    "labels": ('UPDATE keys SET labels = \'{"team":"media"}\' WHERE key_id = ?', lambda k, m: ("t1", k)),
    "parent_key_id": (
        "UPDATE keys SET parent_key_id = '00000000-0000-4000-8000-000000000000' WHERE key_id = ?",
        lambda k, m: ("t1", k),
    ),
    "tenant_id": ("UPDATE keys SET tenant_id = 't2' WHERE key_id = ?", lambda k, m: ("t2", k)),
    "version.created_us": (
        "UPDATE key_versions SET created_us = created_us + 1000 WHERE key_id = ? AND version = 2",
        lambda k, m: ("t1", k),
    ),
    "version.expires_us": (
        "UPDATE key_versions SET expires_us = expires_us + 86400000000 WHERE key_id = ? AND version = 1",
        lambda k, m: ("t1", k),
    ),
    "version.parent_version": (
        "UPDATE key_versions SET parent_version = 7 WHERE key_id = ? AND version = 2",
        lambda k, m: ("t1", k),
    ),
    "version.request_id": (
        "UPDATE key_versions SET request_id = 'other' WHERE key_id = ? AND version = 2",
        lambda k, m: ("t1", k),
    ),
    "version deleted": ("DELETE FROM key_versions WHERE key_id = ? AND version = 1", lambda k, m: ("t1", k)),
    "primary version deleted": (
        "DELETE FROM key_versions WHERE key_id = ? AND version = 2",
        lambda k, m: ("t1", k),
    ),
    "version renumbered": (
        "UPDATE key_versions SET version = 9 WHERE key_id = ? AND version = 1",
        lambda k, m: ("t1", k),
    ),
}


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize("edit", sorted(_SQLITE_EDITS))
def test_a_single_field_edit_in_sqlite_is_refused_on_load(prepared: tuple[ServerHandle, str, str], edit: str) -> None:
    server, key_id, master_id = prepared
    statement, where = _SQLITE_EDITS[edit]
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        assert db.execute(statement, (key_id,)).rowcount == 1
    _load_is_refused(server, where(key_id, master_id))


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize("column", ["disabled", "primary_version"])
def test_an_edit_of_the_master_key_in_sqlite_is_refused_on_load(
    prepared: tuple[ServerHandle, str, str], column: str
) -> None:
    server, _, master_id = prepared
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=master_id))
    server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id="t1", key_id=master_id))
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        value = 1 if column == "disabled" else 2
        db.execute(f"UPDATE keys SET {column} = ? WHERE key_id = ?", (value, master_id))
    with pytest.raises(KeyIntegrityError):
        server.running.serving.get_master_key("t1")


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE key_versions SET expires_us = 1 WHERE key_id = ? AND version = 1",
        "UPDATE key_versions SET parent_version = 2 WHERE key_id = ? AND version = 1",
        "DELETE FROM key_versions WHERE key_id = ? AND version = 1",
    ],
    ids=["expiry moved", "parent changed", "deleted"],
)
def test_an_edited_version_refuses_the_decryption_that_reads_it(server: ServerHandle, statement: str) -> None:
    """A version the key does not hold (not its primary, no state of its own) is read when a ciphertext names it,
    and checked by its own tag then."""
    key = server.create_key("t1")
    old = server.encrypt("t1", key.key_id, b"made with version 1").ciphertext
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        assert db.execute(statement, (key.key_id,)).rowcount == 1
    server.running.keyring.forget_all()  # as after a restart, or the keyring TTL
    assert server.encrypt("t1", key.key_id, b"the primary is intact").key_version == 2
    expect_error(lambda: server.decrypt("t1", old), grpc.StatusCode.DATA_LOSS, "ERROR_REASON_KEY_INTEGRITY")


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_re_enabling_a_disabled_key_in_the_database_is_data_loss_not_a_working_key(
    prepared: tuple[ServerHandle, str, str],
) -> None:
    server, key_id, _ = prepared
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        db.execute("UPDATE keys SET disabled = 0 WHERE key_id = ?", (key_id,))
    server.running.keyring.forget_all()  # as after a restart, or the keyring TTL
    expect_error(
        lambda: server.encrypt("t1", key_id, b"must not encrypt"),
        grpc.StatusCode.DATA_LOSS,
        "ERROR_REASON_KEY_INTEGRITY",
    )
    expect_error(
        lambda: server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key_id)),
        grpc.StatusCode.DATA_LOSS,
        "ERROR_REASON_KEY_INTEGRITY",
    )


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_refused_key_is_logged_and_counted(start_server: StartServer, caplog: pytest.LogCaptureFixture) -> None:
    server = start_server(metrics_port=0)
    key = server.create_key("t1")
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        db.execute("UPDATE keys SET disabled = 1 WHERE key_id = ?", (key.key_id,))
    with pytest.raises(KeyIntegrityError):
        server.running.serving.get_key("t1", key.key_id)
    assert any("integrity check" in record.getMessage() for record in caplog.records)
    assert server.running.metrics is not None
    assert server.running.metrics.integrity_failures._value.get() == 1


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_keys_listed_after_an_edit_are_refused_too(prepared: tuple[ServerHandle, str, str]) -> None:
    server, key_id, _ = prepared
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        db.execute("UPDATE keys SET disabled = 0 WHERE key_id = ?", (key_id,))
    expect_error(
        lambda: server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1")),
        grpc.StatusCode.DATA_LOSS,
        "ERROR_REASON_KEY_INTEGRITY",
    )


# -- MongoDB --------------------------------------------------------------------------------------------------


def _database(server: ServerHandle, mongo_server: MongoServer) -> Database[dict[str, Any]]:
    return mongo_server.client()[server.settings.mongodb_database]


def _shifted(moment: datetime) -> datetime:
    return moment + timedelta(seconds=1)


_MONGO_KEY_EDITS: dict[str, dict[str, Any]] = {
    "disabled": {"$set": {"disabled": False}},
    "primary_version": {"$set": {"primary_version": 1}},
    "key_type": {"$set": {"key_type": "SESSION"}},
    "algorithm": {"$set": {"algorithm": "HMAC_SHA256"}},
    "expire_after_ms": {"$set": {"expire_after_ms": 1}},
    "rotation_period_ms": {"$set": {"rotation_period_ms": 3_600_000}},
    "labels": {"$set": {"labels": {"team": "media"}}},
    "parent_key_id": {"$set": {"parent_key_id": "00000000-0000-4000-8000-000000000000"}},
    "embedded version parent_version": {"$set": {"versions.0.parent_version": 9}},
    "embedded version request_id": {"$set": {"versions.0.request_id": "other"}},
    "embedded version removed": {"$set": {"versions": []}},
}


@pytest.mark.parametrize("backend", ["mongo", "mongo+redis"], indirect=True)
@pytest.mark.parametrize("edit", sorted(_MONGO_KEY_EDITS))
def test_a_single_field_edit_of_a_mongo_key_document_is_refused_on_load(
    prepared: tuple[ServerHandle, str, str], mongo_server: MongoServer, edit: str
) -> None:
    server, key_id, _ = prepared
    db = _database(server, mongo_server)
    document = db["keys"].find_one({"_id": key_id})
    assert document is not None
    if edit.startswith("embedded") and "versions" not in document:
        pytest.fail("keys are created with their first version embedded")
    assert db["keys"].update_one({"_id": key_id}, _MONGO_KEY_EDITS[edit]).modified_count == 1
    _bypass_redis(server)
    _load_is_refused(server, ("t1", key_id))


@pytest.mark.parametrize("backend", ["mongo"], indirect=True)
@pytest.mark.parametrize("edit", ["created_at", "tenant_id"])
def test_moving_a_mongo_key_in_time_or_to_another_tenant_is_refused(
    prepared: tuple[ServerHandle, str, str], mongo_server: MongoServer, edit: str
) -> None:
    server, key_id, _ = prepared
    db = _database(server, mongo_server)
    document = db["keys"].find_one({"_id": key_id})
    assert document is not None
    change = {"created_at": _shifted(document["created_at"])} if edit == "created_at" else {"tenant_id": "t2"}
    db["keys"].update_one({"_id": key_id}, {"$set": change})
    _load_is_refused(server, ("t2" if edit == "tenant_id" else "t1", key_id))


@pytest.mark.parametrize("backend", ["mongo", "mongo+redis"], indirect=True)
@pytest.mark.parametrize("edit", ["created_at", "expires_at", "parent_version", "request_id", "deleted"])
def test_an_edit_of_a_mongo_version_document_is_refused_on_load(
    prepared: tuple[ServerHandle, str, str], mongo_server: MongoServer, edit: str
) -> None:
    server, key_id, _ = prepared
    versions = _database(server, mongo_server)["key_versions"]
    document = versions.find_one({"key_id": key_id, "version": 2})
    assert document is not None
    if edit == "deleted":
        versions.delete_one({"_id": document["_id"]})
    else:
        value: Any = {
            "created_at": _shifted(document["created_at"]),
            "expires_at": _shifted(document["expires_at"]),
            "parent_version": 9,
            "request_id": "other",
        }[edit]
        versions.update_one({"_id": document["_id"]}, {"$set": {edit: value}})
    _bypass_redis(server)
    _load_is_refused(server, ("t1", key_id))


@pytest.mark.parametrize("backend", ["mongo+redis"], indirect=True)
def test_an_edited_redis_entry_is_refused_like_a_database_row(
    prepared: tuple[ServerHandle, str, str], request: pytest.FixtureRequest
) -> None:
    server, key_id, _ = prepared
    redis_client = request.getfixturevalue("redis_server").client()
    (name,) = [n for n in redis_client.keys("caas:crypto:*:key:*") if key_id.encode() in n]
    cached = redis_client.hget(name, "key")
    redis_client.hset(name, "key", cached.replace(b'"disabled":true', b'"disabled":false'))
    _load_is_refused(server, ("t1", key_id))


def _bypass_redis(server: ServerHandle) -> None:
    """With Redis in front, drop its copy so the load reaches the edited database."""
    if server.settings.redis_url:
        client = redis.Redis.from_url(server.settings.redis_url, db=2)
        for name in client.keys("caas:crypto:*:key:*"):
            client.delete(name)


@pytest.mark.parametrize("backend", ["embedded", "mongo"], indirect=True)
def test_unedited_keys_load_and_work(prepared: tuple[ServerHandle, str, str]) -> None:
    server, key_id, _ = prepared
    server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id="t1", key_id=key_id))
    server.running.keyring.forget_all()
    assert server.encrypt("t1", key_id, b"fine").key_version == 2
    assert server.create_key("t1", resources_pb2.KEY_TYPE_SESSION).key_id


# -- keys tagged before versions had tags of their own ------------------------------------------------------


def _tag_as_before_the_split(server: ServerHandle, key_id: str, *, edit: str = "") -> None:
    """Rewrite a key's tags as a server before per-version tags wrote them: one tag over the whole key with every
    version (domain/key_integrity.py canonical_metadata), none on the versions. With `edit`, version 1's
    creation time is then moved in the database (an edit made while the key was tagged the old way)."""
    store = server.running.store
    authenticator = load_metadata_authenticator(store, (server.running.keyring.root,))
    read = store.get_key("t1", key_id)
    assert read is not None
    whole = with_every_version(store, read)
    tag = hmac.new(
        authenticator._key,  # the metadata key, as the old server held it
        b"caas.crypto.v1/key-metadata\x00" + canonical_metadata(whole),
        hashlib.sha256,
    ).digest()
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        db.execute("UPDATE keys SET integrity_tag = ? WHERE key_id = ?", (tag, key_id))
        db.execute("UPDATE key_versions SET integrity_tag = x'' WHERE key_id = ?", (key_id,))
        if edit:
            moved = "UPDATE key_versions SET created_us = created_us + 1000000 WHERE key_id = ? AND version = 1"
            assert db.execute(moved, (key_id,)).rowcount == 1
    server.running.keyring.forget_all()


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_key_tagged_before_the_split_is_checked_whole_then_re_tagged(server: ServerHandle) -> None:
    key = server.create_key("t1")
    old = server.encrypt("t1", key.key_id, b"version 1").ciphertext
    for _ in range(3):
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    _tag_as_before_the_split(server, key.key_id)

    assert server.decrypt("t1", old).plaintext == b"version 1"
    assert server.encrypt("t1", key.key_id, b"new").key_version == 4
    with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        tags = [row[0] for row in db.execute("SELECT integrity_tag FROM key_versions WHERE key_id = ?", (key.key_id,))]
    assert len(tags) == 4 and all(len(tag) == 32 for tag in tags), "every version tagged on the first read"
    server.running.keyring.forget_all()
    assert server.decrypt("t1", old).plaintext == b"version 1", "and read with the new tags afterwards"


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_key_tagged_before_the_split_and_edited_is_refused(server: ServerHandle) -> None:
    key = server.create_key("t1")
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    _tag_as_before_the_split(server, key.key_id, edit="version 1 created")
    expect_error(
        lambda: server.encrypt("t1", key.key_id, b"x"), grpc.StatusCode.DATA_LOSS, "ERROR_REASON_KEY_INTEGRITY"
    )


@pytest.mark.parametrize("backend", ["mongo+redis"], indirect=True)
@pytest.mark.parametrize("change", ["UpdateKey", "RotateKey"])
def test_an_older_redis_entry_given_the_current_revision_is_never_written_back(
    server: ServerHandle, request: pytest.FixtureRequest, change: str
) -> None:
    """The attack: someone who can write Redis keeps a key's cached entry from before a DisableKey (its tag is
    valid: it was true then), and after the DisableKey writes it back with the current revision, which the tag does
    not cover. A change that read the key from that entry would pass the store's compare-and-set on the revision
    and write the old state back with a fresh tag: re-enabled. Changes read the key from the database."""
    key = server.create_key("t1", labels={"team": "messaging"})
    server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key.key_id))  # cached, enabled
    redis_client = request.getfixturevalue("redis_server").client()
    (name,) = [n for n in redis_client.keys("caas:crypto:*:key:*") if key.key_id.encode() in n]
    enabled = json.loads(redis_client.hget(name, "key"))
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=key.key_id))
    current = json.loads(redis_client.hget(name, "key"))
    assert current["disabled"] and current["revision"] > enabled["revision"]
    redis_client.hset(
        name, mapping={"key": json.dumps({**enabled, "revision": current["revision"]}), "revision": current["revision"]}
    )

    if change == "UpdateKey":
        update = key_pb.UpdateKeyRequest(
            tenant_id="t1", key_id=key.key_id, update_mask=FieldMask(paths=["labels"]), labels={"team": "media"}
        )
        assert server.keys.UpdateKey(update).key.state == resources_pb2.KEY_STATE_DISABLED
    else:
        expect_error(
            lambda: server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id)),
            grpc.StatusCode.FAILED_PRECONDITION,
            "ERROR_REASON_KEY_DISABLED",
        )
    stored = server.running.store.get_key("t1", key.key_id)
    assert stored is not None and stored.disabled, "the database still holds the key disabled"
    _bypass_redis(server)
    server.running.keyring.forget_all()
    expect_error(
        lambda: server.encrypt("t1", key.key_id, b"x"), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_DISABLED"
    )
