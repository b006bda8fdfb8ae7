"""The usage budget per key version: uses reserved in blocks by atomic store steps, rotation at the soft
limit, refusal at the hard limit, unused reservations given back (service/usage_budget.py)."""

from __future__ import annotations

import sqlite3
from typing import Any

import grpc
import pytest
from pymongo import MongoClient

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock, ServerHandle, StartServer, expect_error

TENANT = "acme"
# No pass thread: the tests run the passes when they mean to.
MANUAL_FLUSH = {"usage_flush_interval_s": 0}


def _stored_counts(server: ServerHandle, key_id: str) -> dict[int, int]:
    """Encryptions per version as the store holds them, read past every cache."""
    settings = server.settings
    if settings.mongodb_uri is None:
        with sqlite3.connect(settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
            rows = db.execute("SELECT version, encryptions FROM key_versions WHERE key_id = ?", (key_id,))
            return dict(rows.fetchall())
    client: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_uri)
    try:
        database = client[settings.mongodb_database]
        stored = database["key_versions"].find({"key_id": key_id})
        counts = {int(v["version"]): int(v.get("encryptions", 0)) for v in stored}
        key = database["keys"].find_one({"_id": key_id}) or {}
        embedded = key.get("versions", [])
        assert isinstance(embedded, list)
        counts.update((int(v["version"]), int(v.get("encryptions", 0))) for v in embedded)
        return counts
    finally:
        client.close()


def _flush(server: ServerHandle) -> None:
    assert server.running.budget is not None
    server.running.budget.flush()


def _rotate_pass(server: ServerHandle) -> int:
    assert server.running.rotator is not None
    return server.running.rotator.run_once()


def _give_back_idle(server: ServerHandle) -> None:
    """Two passes: the first sees the versions used since the last one, the second gives their unused
    reservations back."""
    _flush(server)
    _flush(server)


@pytest.mark.parametrize("backend", ["mongo+redis"], indirect=True)
def test_every_kind_of_encryption_counts_and_two_replicas_add_up(start_server: StartServer) -> None:
    clock = FakeClock()
    a, b = (start_server(clock=clock, usage_flush_every=100, **MANUAL_FLUSH) for _ in range(2))
    key = a.create_key(TENANT)
    other = a.create_key(TENANT)
    for _ in range(3):
        a.encrypt(TENANT, key.key_id, b"x")
    items = [crypto_pb.BatchEncryptRequest.Item(key_id=key.key_id, plaintext=b"y") for _ in range(2)]
    a.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id=TENANT, items=items))
    a.crypto.GenerateDataKey(crypto_pb.GenerateDataKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    replies = list(
        a.crypto.EncryptStream(iter([crypto_pb.EncryptStreamRequest(tenant_id=TENANT, key_id=key.key_id, chunk=b"z")]))
    )
    assert replies
    sealed = [b.encrypt(TENANT, key.key_id, b"w").ciphertext for _ in range(4)]
    # ReEncrypt counts its destination only (the source is decrypted).
    b.crypto.ReEncrypt(
        crypto_pb.ReEncryptRequest(tenant_id=TENANT, ciphertext=sealed[0], destination_key_id=other.key_id)
    )
    # One block reserved by each replica: what they used and what they hold for the next calls.
    assert _stored_counts(a, key.key_id) == {1: 2 * 100}
    assert _stored_counts(a, other.key_id) == {1: 100}
    # The metric: the highest stored total a replica's reservations saw (b reserved after a).
    assert b.running.budget is not None
    assert b.running.budget.highest_fraction == 200 / b.running.budget.hard_limit

    _give_back_idle(a)
    _give_back_idle(b)
    assert _stored_counts(a, key.key_id) == {1: 3 + 2 + 1 + 1 + 4}
    assert _stored_counts(a, other.key_id) == {1: 1}
    _give_back_idle(a)  # nothing held: nothing given back twice
    assert _stored_counts(a, key.key_id) == {1: 11}


@pytest.mark.parametrize("backend", ["embedded", "mongo", "mongo+redis"], indirect=True)
def test_the_soft_limit_makes_the_rotator_rotate_whatever_the_rotation_period(start_server: StartServer) -> None:
    server = start_server(usage_soft_limit=5, usage_hard_limit=100, usage_flush_every=3, **MANUAL_FLUSH)
    key = server.create_key(TENANT)  # the default rotation period: 90 days away
    for _ in range(3):
        server.encrypt(TENANT, key.key_id, b"x")  # one block of 3: 3 stored
    assert _rotate_pass(server) == 0

    # The 4th reserves the next block: 6 used or reserved, at the soft limit: the key is marked due.
    server.encrypt(TENANT, key.key_id, b"x")
    assert _rotate_pass(server) == 1
    assert _rotate_pass(server) == 0  # rotated once: the new primary starts from zero
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key
    assert got.primary_version == 2
    assert [v.encryptions for v in server.versions(TENANT, key.key_id)] == [6, 0]
    assert server.encrypt(TENANT, key.key_id, b"x").key_version == 2
    _give_back_idle(server)
    assert _stored_counts(server, key.key_id) == {1: 4, 2: 1}


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_the_hard_limit_refuses_to_encrypt_and_decryption_still_works(start_server: StartServer) -> None:
    server = start_server(usage_soft_limit=3, usage_hard_limit=3, usage_flush_every=2, **MANUAL_FLUSH)
    key = server.create_key(TENANT)
    sealed = [server.encrypt(TENANT, key.key_id, f"m{i}".encode()).ciphertext for i in range(3)]

    error = expect_error(
        lambda: server.encrypt(TENANT, key.key_id, b"one too many"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_VERSION_EXHAUSTED",
    )
    assert "rotate" in (error.details() or "")
    items = [crypto_pb.BatchEncryptRequest.Item(key_id=key.key_id, plaintext=b"y")]
    batch = server.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id=TENANT, items=items))
    assert batch.results[0].error.reason == "ERROR_REASON_KEY_VERSION_EXHAUSTED"
    assert [server.decrypt(TENANT, c).plaintext for c in sealed] == [b"m0", b"m1", b"m2"]
    assert _stored_counts(server, key.key_id) == {1: 3}, "the last block was cut to what was left"

    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    assert server.encrypt(TENANT, key.key_id, b"fresh").key_version == 2
    _give_back_idle(server)
    assert _stored_counts(server, key.key_id) == {1: 3, 2: 1}


@pytest.mark.parametrize("backend", ["mongo+redis"], indirect=True)
def test_replicas_share_the_hard_limit_exactly_through_their_reservations(start_server: StartServer) -> None:
    clock = FakeClock()
    limits = {"usage_soft_limit": 6, "usage_hard_limit": 6, "usage_flush_every": 2, **MANUAL_FLUSH}
    a, b = (start_server(clock=clock, **limits) for _ in range(2))
    key = a.create_key(TENANT)
    for _ in range(3):
        b.encrypt(TENANT, key.key_id, b"x")  # b reserved 2 + 2: one use left in hand
    for _ in range(2):
        a.encrypt(TENANT, key.key_id, b"x")  # the last 2 of the 6
    # a's third call reserves and is granted nothing: the budget is spent or held by b.
    expect_error(
        lambda: a.encrypt(TENANT, key.key_id, b"x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_VERSION_EXHAUSTED",
    )
    b.encrypt(TENANT, key.key_id, b"x")  # b's use in hand
    expect_error(
        lambda: b.encrypt(TENANT, key.key_id, b"x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_VERSION_EXHAUSTED",
    )
    assert _stored_counts(a, key.key_id) == {1: 6}, "3 + 2 + 1: exactly the hard limit, across both replicas"


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_unused_reservations_are_given_back_at_shutdown(start_server: StartServer) -> None:
    server = start_server(**MANUAL_FLUSH)
    key = server.create_key(TENANT)
    for _ in range(3):
        server.encrypt(TENANT, key.key_id, b"x")
    assert _stored_counts(server, key.key_id) == {1: 4096}, "one block of the default size"
    server.stop()
    assert _stored_counts(server, key.key_id) == {1: 3}


def _write_stored_count(server: ServerHandle, key_id: str, count: int) -> None:
    """Set version 1's stored count straight in the database, as a bug or someone with write access could."""
    settings = server.settings
    if settings.mongodb_uri is None:
        with sqlite3.connect(settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
            db.execute("UPDATE key_versions SET encryptions = ? WHERE key_id = ? AND version = 1", (count, key_id))
        return
    client: MongoClient[dict[str, Any]] = MongoClient(settings.mongodb_uri)
    try:
        client[settings.mongodb_database]["keys"].update_one(
            {"_id": key_id}, {"$set": {"versions.$[first].encryptions": count}}, array_filters=[{"first.version": 1}]
        )
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["embedded", "mongo"], indirect=True)
def test_a_stored_count_below_zero_does_not_break_the_key_or_its_tenants_listings(start_server: StartServer) -> None:
    """Counts fell below zero when reservations were given back twice (issue 22): the count is a uint64 on the
    wire, and every reading of the key, ListKeys of the whole tenant included, answered INTERNAL."""
    server = start_server(**MANUAL_FLUSH)
    broken, other = server.create_key(TENANT), server.create_key(TENANT)
    _write_stored_count(server, broken.key_id, -2933)
    server.running.keyring.forget(TENANT, broken.key_id)  # read from the store again

    listed = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT))
    assert {broken.key_id, other.key_id} <= {k.key_id for k in listed.keys}
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=broken.key_id))
    assert [v.encryptions for v in got.key.versions] == [0], "read as the nearest bound"
    versions = server.keys.ListKeyVersions(key_pb.ListKeyVersionsRequest(tenant_id=TENANT, key_id=broken.key_id))
    assert [v.encryptions for v in versions.versions] == [0]
    assert server.encrypt(TENANT, broken.key_id, b"still usable").key_version == 1
