"""Automatic rotation (one rotator per deployment, by lease), next_rotation_at, UpdateKey, and what expiry means."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.service.key_rotator import LEASE_NAME
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock, ServerHandle, StartServer, expect_error
from tests.servers import MongoServer
from tests.waiting import eventually

HOUR = timedelta(hours=1)
TENANT = "acme"


def _rotor(server: ServerHandle) -> int:
    assert server.running.rotator is not None
    return server.running.rotator.run_once()


def _get(server: ServerHandle, key_id: str) -> resources_pb2.Key:
    return server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key_id)).key


def _update(server: ServerHandle, key_id: str, *paths: str, **fields: object) -> resources_pb2.Key:
    request = key_pb.UpdateKeyRequest(tenant_id=TENANT, key_id=key_id, update_mask=FieldMask(paths=list(paths)))
    for name, value in fields.items():
        if isinstance(value, dict):
            getattr(request, name).update(value)
        else:
            getattr(request, name).CopyFrom(value)
    return server.keys.UpdateKey(request).key


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_a_key_gets_a_new_primary_when_its_rotation_period_has_passed(server: ServerHandle) -> None:
    key = server.create_key(TENANT, rotation_period=Duration(seconds=3600))
    assert key.next_rotation_at.ToDatetime() == key.created_at.ToDatetime() + HOUR
    sealed = server.encrypt(TENANT, key.key_id, b"before").ciphertext

    server.clock.advance(HOUR - timedelta(seconds=1))
    assert _rotor(server) == 0
    server.clock.advance(timedelta(seconds=1))
    assert _rotor(server) == 1
    assert _rotor(server) == 0  # due once per period

    rotated = _get(server, key.key_id)
    assert rotated.primary_version == 2
    assert rotated.next_rotation_at.ToDatetime() == rotated.versions[-1].created_at.ToDatetime() + HOUR
    assert server.encrypt(TENANT, key.key_id, b"after").key_version == 2
    assert server.decrypt(TENANT, sealed).plaintext == b"before"
    # Recorded like a RotateKey, by the system.
    assert server.running.audit is not None
    server.running.audit.flush()
    records = server.keys.ReadAuditLog(key_pb.ReadAuditLogRequest(tenant_id=TENANT, page_size=100)).records
    automatic = [(r.phase, r.outcome, r.key_version) for r in records if r.principal == "system"]
    assert automatic == [("intent", "PENDING", 0), ("outcome", "OK", 2)]
    assert {r.rpc for r in records if r.principal == "system"} == {"RotateKey"}


@pytest.mark.parametrize("backend", ["mongo+redis"], indirect=True)
def test_two_replicas_rotate_once_per_period_and_the_other_takes_over_when_the_holder_dies(
    start_server: StartServer,
) -> None:
    clock = FakeClock()
    # A lease longer than the clock's steps, so that holding it (not only a key being due) decides who rotates.
    a, b = (start_server(clock=clock, rotation_lease_s=2 * 3600) for _ in range(2))
    key = a.create_key(TENANT, rotation_period=Duration(seconds=3600))
    for _ in range(3):
        clock.advance(HOUR)
        assert _rotor(a) + _rotor(b) == 1
        assert _rotor(b) == 0
    assert _get(b, key.key_id).primary_version == 4  # 3 h, a 1 h period: exactly 3 new versions
    assert not b.running.store.acquire_lease(LEASE_NAME, "someone-else", clock.now(), HOUR)

    # `a` dies holding the lease (it never gives it up): `b` rotates once the lease has run out, not before.
    clock.advance(HOUR)
    assert _rotor(b) == 0
    clock.advance(HOUR)
    assert _rotor(b) == 1
    assert _get(b, key.key_id).primary_version == 5


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_clean_shutdown_hands_the_lease_over_at_once(start_server: StartServer) -> None:
    clock = FakeClock()
    a, b = (start_server(clock=clock, rotation_lease_s=2 * 3600) for _ in range(2))
    key = a.create_key(TENANT, rotation_period=Duration(seconds=3600))
    clock.advance(HOUR)
    assert _rotor(a) == 1
    a.stop()
    clock.advance(HOUR)
    assert _rotor(b) == 1
    assert _get(b, key.key_id).primary_version == 3


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_the_rotation_thread_runs_passes_on_its_interval(start_server: StartServer) -> None:
    server = start_server(rotation_interval_s=0.05, rotation_lease_s=1)
    key = server.create_key(TENANT, rotation_period=Duration(seconds=3600))
    server.clock.advance(HOUR)
    # The clock says the key is due; the server's own rotation thread must notice it.
    eventually(lambda: _get(server, key.key_id).primary_version == 2, timeout_s=5, what="the due key rotated")


@pytest.mark.parametrize("backend", ["embedded", "mongo"], indirect=True)
def test_a_key_whose_versions_expire_keeps_encrypting_while_it_has_a_rotation_period(server: ServerHandle) -> None:
    rotating = server.create_key(TENANT, expire_after=Duration(seconds=2 * 3600))
    fixed = server.create_key(TENANT, expire_after=Duration(seconds=2 * 3600))
    assert not _update(server, fixed.key_id, "rotation_period").HasField("next_rotation_at")
    # Rotated in the last tenth of its primary's lifetime, well before its 90-day rotation period.
    lifetime_end = rotating.expires_at.ToDatetime()
    assert rotating.next_rotation_at.ToDatetime() == lifetime_end - timedelta(minutes=12)
    old = server.encrypt(TENANT, fixed.key_id, b"old").ciphertext

    server.clock.advance(timedelta(hours=1, minutes=50))
    assert _rotor(server) == 1
    server.clock.advance(timedelta(minutes=20))  # past the first versions' expiry
    assert server.encrypt(TENANT, rotating.key_id, b"x").key_version == 2
    # Without a rotation period the key itself is expired: no new encryptions, old data still decrypts.
    expect_error(
        lambda: server.encrypt(TENANT, fixed.key_id, b"x"),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_EXPIRED",
    )
    assert server.decrypt(TENANT, old).plaintext == b"old"


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_update_key_changes_the_named_fields_only(server: ServerHandle) -> None:
    key = server.create_key(TENANT, labels={"team": "a"}, rotation_period=Duration(seconds=7 * 86400))
    updated = _update(server, key.key_id, "rotation_period", rotation_period=Duration(seconds=3600))
    assert updated.rotation_period.ToTimedelta() == HOUR
    assert updated.next_rotation_at.ToDatetime() == key.created_at.ToDatetime() + HOUR
    assert dict(updated.labels) == {"team": "a"} and updated.expires_at == key.expires_at

    updated = _update(
        server, key.key_id, "labels", "expire_after", labels={"team": "b"}, expire_after=Duration(seconds=600)
    )
    assert dict(updated.labels) == {"team": "b"}
    # The new lifetime is for versions created from now on; the primary keeps its expiry.
    assert updated.expires_at == key.expires_at
    # Stored, with a valid integrity tag (a read checks it), on this server and through the cache.
    stored = _get(server, key.key_id)
    assert dict(stored.labels) == {"team": "b"} and stored.rotation_period.ToTimedelta() == HOUR
    rotated = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key
    assert rotated.expires_at.ToDatetime() == rotated.versions[1].created_at.ToDatetime() + timedelta(minutes=10)

    cleared = _update(server, key.key_id, "rotation_period")
    assert not cleared.HasField("rotation_period") and not cleared.HasField("next_rotation_at")
    server.clock.advance(timedelta(days=1))
    assert _rotor(server) == 0


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_update_key_refuses_what_it_cannot_change(server: ServerHandle) -> None:
    key = server.create_key(TENANT)
    expect_error(
        lambda: _update(server, key.key_id),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "update_mask",
    )
    expect_error(
        lambda: _update(server, key.key_id, "key_type"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "update_mask",
    )
    expect_error(
        lambda: _update(server, key.key_id, "rotation_period", rotation_period=Duration(seconds=60)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "rotation_period",
    )
    session = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id=TENANT)).key
    assert not session.HasField("next_rotation_at")
    expect_error(
        lambda: _update(server, session.key_id, "rotation_period", rotation_period=Duration(seconds=3600)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "update_mask",
    )
    assert dict(_update(server, session.key_id, "labels", labels={"call": "1"}).labels) == {"call": "1"}
    expect_error(
        lambda: _update(server, "00000000-0000-4000-8000-000000000000", "labels"),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_KEY_NOT_FOUND",
    )


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_disabled_key_is_not_rotated_until_it_is_enabled(server: ServerHandle) -> None:
    key = server.create_key(TENANT, rotation_period=Duration(seconds=3600))
    disabled = server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key
    assert not disabled.HasField("next_rotation_at")
    server.clock.advance(2 * HOUR)
    assert _rotor(server) == 0
    server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    assert _rotor(server) == 1  # overdue: at the next pass


def _forget_schedules(server: ServerHandle, request: pytest.FixtureRequest) -> None:
    """Make every stored key look as one written before automatic rotation existed."""
    if server.settings.mongodb_uri:
        mongo: MongoServer = request.getfixturevalue("mongo_server")
        with mongo.client() as client:
            client[server.settings.mongodb_database]["keys"].update_many({}, {"$unset": {"next_rotation_at": ""}})
    else:
        with sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
            db.execute("UPDATE keys SET next_rotation_us = 0")  # what the added column gives an older row


@pytest.mark.parametrize("backend", ["embedded", "mongo"], indirect=True)
def test_keys_stored_before_automatic_rotation_are_scheduled_from_their_metadata(
    server: ServerHandle, request: pytest.FixtureRequest
) -> None:
    key = server.create_key(TENANT, rotation_period=Duration(seconds=3600))
    _forget_schedules(server, request)
    store = server.running.store
    assert (TENANT, key.key_id) in store.keys_due_for_rotation(server.clock.now(), 100)
    assert _rotor(server) == 0  # not due by its authenticated metadata: rescheduled, not rotated
    assert store.keys_due_for_rotation(server.clock.now(), 100) == []
    server.clock.advance(HOUR)
    assert store.keys_due_for_rotation(server.clock.now(), 100) == [(TENANT, key.key_id)]
    assert _rotor(server) == 1
