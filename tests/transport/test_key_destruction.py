"""Version states and destruction: disabled versions, min_decryption_version, scheduled destruction (cancelled or
carried out), and crypto-shredding of a whole tenant, with the material looked for in every backend afterwards."""

from __future__ import annotations

import base64
import sqlite3
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import bson
import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from google.protobuf.field_mask_pb2 import FieldMask
from pymongo import MongoClient

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain.keys import Key
from crypto_server.service.change_poller import ChangePoller
from crypto_server.storage.port import KeyQuery
from crypto_server.storage.redis.guard import connect
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import BACKENDS, FakeClock, ServerHandle, StartServer, expect_error

TENANT = "acme"
OTHER = "globex"
DAY = timedelta(days=1)
WAIT = 7 * DAY
FAILED = grpc.StatusCode.FAILED_PRECONDITION
DESTROYED = "ERROR_REASON_KEY_VERSION_DESTROYED"
DISABLED = "ERROR_REASON_KEY_VERSION_DISABLED"
STATE = "ERROR_REASON_KEY_VERSION_STATE"
V = resources_pb2


def _get(server: ServerHandle, key_id: str, tenant: str = TENANT) -> resources_pb2.Key:
    return server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=tenant, key_id=key_id)).key


def _states(server: ServerHandle, key_id: str) -> list[int]:
    return [v.state for v in server.versions(TENANT, key_id)]


def _rotate(server: ServerHandle, key_id: str) -> None:
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key_id))


def _schedule_version(server: ServerHandle, key_id: str, version: int, **fields: object) -> resources_pb2.Key:
    request = key_pb.ScheduleKeyVersionDestructionRequest(tenant_id=TENANT, key_id=key_id, version=version, **fields)
    return server.keys.ScheduleKeyVersionDestruction(request).key


def _schedule_key(server: ServerHandle, key_id: str) -> resources_pb2.Key:
    return server.keys.ScheduleKeyDestruction(key_pb.ScheduleKeyDestructionRequest(tenant_id=TENANT, key_id=key_id)).key


def _cancel(server: ServerHandle, key_id: str, version: int = 0) -> resources_pb2.Key:
    request = key_pb.CancelKeyDestructionRequest(tenant_id=TENANT, key_id=key_id, version=version)
    return server.keys.CancelKeyDestruction(request).key


def _pass(server: ServerHandle) -> int:
    assert server.running.destroyer is not None
    return server.running.destroyer.run_once()


def _wrapped(server: ServerHandle, tenant: str, key_id: str) -> list[bytes]:
    """Every version's wrapped material as the store holds it now."""
    return [v.wrapped_material for v in server.running.store.list_versions(tenant, key_id, 0, 1000)]


# -- scans of every backend --------------------------------------------------------------


def _forms(material: bytes) -> list[bytes]:
    """The ways a stored copy may be written: raw (SQLite, BSON) or base64 (the Redis entry's JSON)."""
    return [material, base64.b64encode(material)]


def _scan_sqlite(data_dir: Path) -> list[bytes]:
    """Every value of every row of every table, and the raw bytes of the database file and its journal."""
    path = data_dir / SqliteKeyStore.FILE_NAME
    found: list[bytes] = []
    db = sqlite3.connect(path)
    try:
        tables = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            for row in db.execute(f'SELECT * FROM "{table}"'):  # table names from sqlite_master
                found.extend(value if isinstance(value, bytes) else str(value).encode() for value in row)
    finally:
        db.close()
    for suffix in ("", "-wal", "-journal"):
        file = path.with_name(path.name + suffix)
        if file.exists():
            found.append(file.read_bytes())
    return found


def _scan_mongo(uri: str, database: str) -> list[bytes]:
    client: MongoClient[dict[str, object]] = MongoClient(uri)
    try:
        db = client[database]
        return [bson.encode(document) for name in db.list_collection_names() for document in db[name].find()]
    finally:
        client.close()


def _scan_redis(url: str) -> list[bytes]:
    client = connect(url, timeout_s=2.0)
    found: list[bytes] = []
    try:
        for name in client.scan_iter(match="*"):
            kind = client.type(name)
            if kind == b"hash":
                found.extend(client.hgetall(name).values())
            elif kind == b"string":
                found.append(client.get(name) or b"")
    finally:
        client.close()
    return found


def _scan(server: ServerHandle) -> list[bytes]:
    settings = server.settings
    if settings.mongodb_uri:
        values = _scan_mongo(settings.mongodb_uri, settings.mongodb_database)
        # Nothing to find in an empty scan proves nothing: the database must hold the key documents.
        assert values
    else:
        values = _scan_sqlite(settings.data_dir)
    if settings.redis_url:
        values += _scan_redis(settings.redis_url)
    return values


def _assert_erased(server: ServerHandle, materials: list[bytes]) -> None:
    values = _scan(server)
    for material in materials:
        assert len(material) > 32
        for form in _forms(material):
            assert not any(form in value for value in values), "wrapped material still stored"


def _assert_present(server: ServerHandle, materials: list[bytes]) -> None:
    """The scan does find material that was not destroyed (so it can find the destroyed one)."""
    values = _scan(server)
    for material in materials:
        assert any(form in value for form in _forms(material) for value in values)


# -- versions: disabled, min_decryption_version ------------------------------------------


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_min_decryption_version_and_disabled_versions_refuse_to_decrypt_until_undone(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    sealed = [server.encrypt(TENANT, key_id, b"one").ciphertext]
    for _ in range(2):
        _rotate(server, key_id)
        sealed.append(server.encrypt(TENANT, key_id, b"next").ciphertext)

    def update(minimum: int) -> resources_pb2.Key:
        request = key_pb.UpdateKeyRequest(
            tenant_id=TENANT,
            key_id=key_id,
            update_mask=FieldMask(paths=["min_decryption_version"]),
            min_decryption_version=minimum,
        )
        return server.keys.UpdateKey(request).key

    key = update(2)
    assert key.min_decryption_version == 2
    assert _states(server, key_id) == [V.KEY_VERSION_STATE_DISABLED] + [V.KEY_VERSION_STATE_ENABLED] * 2
    expect_error(lambda: server.decrypt(TENANT, sealed[0]), FAILED, DISABLED)
    assert server.decrypt(TENANT, sealed[1]).plaintext == b"next"
    expect_error(lambda: update(4), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD")
    # A version below the minimum is enabled by lowering the minimum, not one by one.
    enable_first = key_pb.EnableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=1)
    expect_error(lambda: server.keys.EnableKeyVersion(enable_first), FAILED, STATE)
    update(0)
    assert server.decrypt(TENANT, sealed[0]).plaintext == b"one"

    disable = key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=2)
    disabled = server.keys.DisableKeyVersion(disable).key
    assert [v.state for v in disabled.versions if v.version == 2] == [V.KEY_VERSION_STATE_DISABLED]
    expect_error(lambda: server.decrypt(TENANT, sealed[1]), FAILED, DISABLED)
    assert server.decrypt(TENANT, sealed[2]).plaintext == b"next"
    primary = key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=3)
    expect_error(lambda: server.keys.DisableKeyVersion(primary), FAILED, STATE)
    server.keys.EnableKeyVersion(key_pb.EnableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=2))
    assert server.decrypt(TENANT, sealed[1]).plaintext == b"next"
    missing = key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=9)
    expect_error(
        lambda: server.keys.DisableKeyVersion(missing), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD"
    )


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_version_state_edited_in_the_store_fails_the_integrity_check(start_server: StartServer) -> None:
    server = start_server()
    key_id = server.create_key(TENANT).key_id
    sealed = server.encrypt(TENANT, key_id, b"one").ciphertext
    _rotate(server, key_id)
    server.keys.DisableKeyVersion(key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=1))
    server.stop()
    # The attack: re-enable the version (and cancel nothing else) by editing the row.
    db = sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME)
    with db:
        assert db.execute("UPDATE key_versions SET disabled = 0 WHERE key_id = ?", (key_id,)).rowcount == 2
    db.close()
    fresh = start_server()
    expect_error(lambda: fresh.decrypt(TENANT, sealed), grpc.StatusCode.DATA_LOSS, "ERROR_REASON_KEY_INTEGRITY")


# -- scheduled destruction ---------------------------------------------------------------


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_a_cancelled_destruction_leaves_the_version_usable(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    sealed = server.encrypt(TENANT, key_id, b"kept").ciphertext
    _rotate(server, key_id)
    now = server.clock.now()

    scheduled = _schedule_version(server, key_id, 1).versions[0]
    assert scheduled.state == V.KEY_VERSION_STATE_DESTROY_SCHEDULED
    assert scheduled.destroy_at.ToDatetime(tzinfo=now.tzinfo) == now + WAIT  # the default waiting period
    # Meanwhile it refuses, as a disabled version does.
    expect_error(lambda: server.decrypt(TENANT, sealed), FAILED, DISABLED)

    restored = _cancel(server, key_id, 1).versions[0]
    assert restored.state == V.KEY_VERSION_STATE_ENABLED
    assert not restored.HasField("destroy_at")
    server.clock.advance(WAIT + DAY)
    assert _pass(server) == 0
    assert server.decrypt(TENANT, sealed).plaintext == b"kept"
    # Nothing left to cancel.
    expect_error(lambda: _cancel(server, key_id, 1), FAILED, STATE)


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_a_cancelled_destruction_restores_the_state_before_it(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    _rotate(server, key_id)
    server.keys.DisableKeyVersion(key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=key_id, version=1))
    _schedule_version(server, key_id, 1)
    assert _cancel(server, key_id).versions[0].state == V.KEY_VERSION_STATE_DISABLED


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize(
    ("seconds", "accepted"),
    [(DAY.total_seconds() - 1, False), (DAY.total_seconds(), True), (30 * 86400, True), (30 * 86400 + 1, False)],
)
def test_the_waiting_period_is_one_to_thirty_days(server: ServerHandle, seconds: float, accepted: bool) -> None:
    key_id = server.create_key(TENANT).key_id
    _rotate(server, key_id)

    def call() -> resources_pb2.Key:
        return _schedule_version(server, key_id, 1, waiting_period=Duration(seconds=int(seconds)))

    if accepted:
        version = call().versions[0]
        assert version.destroy_at.ToDatetime(tzinfo=server.clock.now().tzinfo) == server.clock.now() + timedelta(
            seconds=seconds
        )
    else:
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "waiting_period")


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_the_primary_cannot_be_destroyed_until_another_version_is_primary(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    expect_error(lambda: _schedule_version(server, key_id, 1), FAILED, STATE)
    _rotate(server, key_id)
    assert _schedule_version(server, key_id, 1).versions[0].state == V.KEY_VERSION_STATE_DESTROY_SCHEDULED
    expect_error(lambda: _schedule_version(server, key_id, 2), FAILED, STATE)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)  # the root key in a file or in an HSM
def test_a_destroyed_version_is_gone_from_every_backend_and_decrypt_says_so(start_server: StartServer) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    key_id = server.create_key(TENANT).key_id
    sealed = [server.encrypt(TENANT, key_id, b"first").ciphertext]
    for _ in range(2):  # version 1 lives in MongoDB's key document, version 2 in key_versions
        _rotate(server, key_id)
        sealed.append(server.encrypt(TENANT, key_id, b"later").ciphertext)
    _rotate(server, key_id)
    materials = _wrapped(server, TENANT, key_id)
    for version in (1, 2):
        _schedule_version(server, key_id, version)
    for ciphertext in sealed[:2]:  # the entries in Redis and in the keyring hold the scheduled state
        expect_error(lambda c=ciphertext: server.decrypt(TENANT, c), FAILED, DISABLED)  # type: ignore[misc]
    _assert_present(server, materials)

    clock.advance(WAIT - timedelta(seconds=1))
    assert _pass(server) == 0
    clock.advance(timedelta(seconds=1))
    assert _pass(server) == 2
    assert _pass(server) == 0

    versions = server.versions(TENANT, key_id)
    assert [v.state for v in versions] == [V.KEY_VERSION_STATE_DESTROYED] * 2 + [V.KEY_VERSION_STATE_ENABLED] * 2
    assert versions[0].destroyed_at.ToDatetime(tzinfo=clock.now().tzinfo) == clock.now()
    for ciphertext in sealed[:2]:
        expect_error(lambda c=ciphertext: server.decrypt(TENANT, c), FAILED, DESTROYED)  # type: ignore[misc]
    assert server.decrypt(TENANT, sealed[2]).plaintext == b"later"
    _assert_erased(server, materials[:2])
    _assert_present(server, materials[2:])
    expect_error(lambda: _cancel(server, key_id, 1), FAILED, STATE)
    # A server that never held the key answers the same from the store.
    fresh = start_server(clock=clock)
    expect_error(lambda: fresh.decrypt(TENANT, sealed[0]), FAILED, DESTROYED)
    assert fresh.decrypt(TENANT, sealed[2]).plaintext == b"later"


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_a_whole_key_is_scheduled_cancelled_then_destroyed(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    sealed = server.encrypt(TENANT, key_id, b"one").ciphertext
    _rotate(server, key_id)

    key = _schedule_key(server, key_id)
    assert key.state == V.KEY_STATE_DESTROY_SCHEDULED
    assert [v.state for v in key.versions] == [V.KEY_VERSION_STATE_DESTROY_SCHEDULED] * 2
    expect_error(lambda: server.encrypt(TENANT, key_id, b"x"), FAILED, DISABLED)
    expect_error(lambda: _rotate(server, key_id), FAILED, STATE)  # no fresh primary behind the owner's back
    assert _cancel(server, key_id).state == V.KEY_STATE_ENABLED
    assert server.encrypt(TENANT, key_id, b"x").key_version == 2

    _schedule_key(server, key_id)
    server.clock.advance(WAIT)
    assert _pass(server) == 2
    key = _get(server, key_id)
    assert key.state == V.KEY_STATE_DESTROYED
    assert [v.state for v in key.versions] == [V.KEY_VERSION_STATE_DESTROYED] * 2
    expect_error(lambda: server.encrypt(TENANT, key_id, b"x"), FAILED, DESTROYED)
    expect_error(lambda: server.decrypt(TENANT, sealed), FAILED, DESTROYED)
    expect_error(lambda: _cancel(server, key_id), FAILED, STATE)


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_master_key_is_destroyed_only_with_its_tenant(server: ServerHandle) -> None:
    server.create_key(TENANT)
    master = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT, key_type=V.KEY_TYPE_MASTER)).keys[0].key_id
    expect_error(lambda: _schedule_key(server, master), FAILED, "ERROR_REASON_KEY_TYPE_MISMATCH")


# -- tenant shredding ------------------------------------------------------------------


def _tenant_materials(server: ServerHandle, tenant: str) -> list[bytes]:
    master = server.running.store.get_master_key(tenant)
    assert master is not None
    keys = server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=tenant)).keys
    return [m for key in keys for m in _wrapped(server, tenant, key.key_id)]


def _schedule_tenant(server: ServerHandle) -> key_pb.ScheduleTenantDestructionResponse:
    return server.keys.ScheduleTenantDestruction(key_pb.ScheduleTenantDestructionRequest(tenant_id=TENANT))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)  # the root key in a file or in an HSM
def test_a_shredded_tenant_can_decrypt_nothing_on_any_path(start_server: StartServer) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    data = server.create_key(TENANT).key_id
    other_data = server.create_key(TENANT).key_id
    sealed = [server.encrypt(TENANT, data, b"one").ciphertext]
    _rotate(server, data)
    sealed += [server.encrypt(TENANT, data, b"two").ciphertext, server.encrypt(TENANT, other_data, b"3").ciphertext]
    session = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id=TENANT)).key.key_id
    bystander = server.create_key(OTHER).key_id
    kept = server.encrypt(OTHER, bystander, b"theirs").ciphertext
    materials = _tenant_materials(server, TENANT)
    assert len(materials) == 5  # master, data (2 versions), other data, session
    _assert_present(server, materials)

    scheduled = _schedule_tenant(server)
    assert scheduled.destroy_at.ToDatetime(tzinfo=clock.now().tzinfo) == clock.now() + WAIT
    pending = "ERROR_REASON_TENANT_DESTRUCTION_SCHEDULED"
    expect_error(lambda: server.decrypt(TENANT, sealed[0]), FAILED, pending)
    expect_error(lambda: server.encrypt(TENANT, data, b"x"), FAILED, pending)
    expect_error(lambda: server.create_key(TENANT), FAILED, pending)
    server.keys.CancelTenantDestruction(key_pb.CancelTenantDestructionRequest(tenant_id=TENANT))
    assert server.decrypt(TENANT, sealed[0]).plaintext == b"one"

    _schedule_tenant(server)
    clock.advance(WAIT)
    assert _pass(server) == 1  # the master key's one version (its keys' versions go with it)
    gone = "ERROR_REASON_TENANT_DESTROYED"
    for ciphertext in sealed:
        expect_error(lambda c=ciphertext: server.decrypt(TENANT, c), FAILED, gone)  # type: ignore[misc]
    expect_error(lambda: server.encrypt(TENANT, data, b"x"), FAILED, gone)
    expect_error(lambda: server.create_key(TENANT), FAILED, gone)  # no new master key behind it
    get_session = key_pb.GetSessionKeyRequest(tenant_id=TENANT, key_id=session)
    expect_error(lambda: server.keys.GetSessionKey(get_session), FAILED, gone)
    cancel = key_pb.CancelTenantDestructionRequest(tenant_id=TENANT)
    expect_error(lambda: server.keys.CancelTenantDestruction(cancel), FAILED, gone)
    assert {
        v.state for key in server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT)).keys for v in key.versions
    } == {V.KEY_VERSION_STATE_DESTROYED}
    _assert_erased(server, materials)
    assert server.decrypt(OTHER, kept).plaintext == b"theirs"

    # A server started afresh on the same store (nothing in its memory) cannot either.
    fresh = start_server(clock=clock)
    for ciphertext in sealed:
        expect_error(lambda c=ciphertext: fresh.decrypt(TENANT, c), FAILED, gone)  # type: ignore[misc]
    expect_error(lambda: fresh.create_key(TENANT), FAILED, gone)
    assert fresh.decrypt(OTHER, kept).plaintext == b"theirs"


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_scheduling_a_tenant_schedules_every_version_of_its_master_key(server: ServerHandle) -> None:
    """Not only the versions the master key holds when read (its primary): every one, 1 to the primary."""
    server.create_key(TENANT)
    master = server.running.store.get_master_key(TENANT)
    assert master is not None
    for _ in range(2):
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=master.key_id))
    _schedule_tenant(server)
    assert _states(server, master.key_id) == [V.KEY_VERSION_STATE_DESTROY_SCHEDULED] * 3


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_tenant_without_keys_cannot_be_scheduled(server: ServerHandle) -> None:
    expect_error(lambda: _schedule_tenant(server), grpc.StatusCode.NOT_FOUND, "ERROR_REASON_KEY_NOT_FOUND")


# -- races with the Redis cache, the destruction pass and a store altered ---------------------------


def _poll(*servers: ServerHandle) -> None:
    """Every server's change poller handles what the store changed (once per key and revision)."""
    for server in servers:
        poller = next(task for task in server.running.background if isinstance(task, ChangePoller))
        poller.poll_once()


def _slow_reader(monkeypatch: pytest.MonkeyPatch, server: ServerHandle, meanwhile: Callable[[], None]) -> None:
    """`server`'s next read of a key from the store is slow: `meanwhile` runs between the read and the moment
    the reader puts what it read into Redis."""
    store = server.running.store
    read = store.get_key
    pending = [meanwhile]

    def get_key(tenant_id: str, key_id: str) -> Key | None:
        key = read(tenant_id, key_id)
        if pending:
            pending.pop()()
        return key

    monkeypatch.setattr(store, "get_key", get_key)


def _evict_redis(server: ServerHandle) -> None:
    """The cache loses its entries (eviction, a restart): the next reader reads the store."""
    client = connect(server.settings.redis_url, timeout_s=2.0)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.mark.parametrize("backend", ["embedded+redis", "mongo+redis"], indirect=True)
def test_a_slow_reader_never_puts_back_a_version_state_older_than_a_change(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    writer = start_server(clock=clock)
    key_id = writer.create_key(TENANT).key_id
    sealed = writer.encrypt(TENANT, key_id, b"one").ciphertext
    _rotate(writer, key_id)
    _evict_redis(writer)
    reader = start_server(clock=clock)

    def schedule() -> None:  # lands while the reader holds the state from before it
        _schedule_version(writer, key_id, 1)
        _poll(writer, reader)

    _slow_reader(monkeypatch, reader, schedule)
    # The key it read (before the change) holds only its primary: version 1 is read when the ciphertext names
    # it, after the change, and refuses (a version read later than its key only ever refuses more).
    expect_error(lambda: reader.decrypt(TENANT, sealed), FAILED, DISABLED)
    _poll(writer, reader)

    later = start_server(clock=clock)  # a server that never held the key: it reads Redis
    expect_error(lambda: later.decrypt(TENANT, sealed), FAILED, DISABLED)
    assert _states(later, key_id) == [V.KEY_VERSION_STATE_DESTROY_SCHEDULED, V.KEY_VERSION_STATE_ENABLED]
    export = key_pb.ExportKeyRequest(tenant_id=TENANT, key_id=key_id)
    expect_error(lambda: later.keys.ExportKey(export), FAILED, STATE)


@pytest.mark.parametrize("backend", ["embedded+redis", "mongo+redis"], indirect=True)
def test_a_slow_reader_never_puts_destroyed_material_back_into_redis(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    destroyer = start_server(clock=clock)
    key_id = destroyer.create_key(TENANT).key_id
    sealed = destroyer.encrypt(TENANT, key_id, b"one").ciphertext
    _rotate(destroyer, key_id)
    materials = _wrapped(destroyer, TENANT, key_id)
    _schedule_version(destroyer, key_id, 1)
    _evict_redis(destroyer)
    clock.advance(WAIT)
    reader = start_server(clock=clock)

    def destroy() -> None:  # the pass runs while the reader holds the key from before it
        assert _pass(destroyer) == 1
        _poll(destroyer, reader)

    _slow_reader(monkeypatch, reader, destroy)
    expect_error(lambda: reader.decrypt(TENANT, sealed), FAILED, DISABLED)  # it read the scheduled state
    _poll(destroyer, reader)

    _assert_erased(destroyer, materials[:1])
    _assert_present(destroyer, materials[1:])
    expect_error(lambda: start_server(clock=clock).decrypt(TENANT, sealed), FAILED, DESTROYED)


def _cancel_tenant(server: ServerHandle) -> key_pb.CancelTenantDestructionResponse:
    return server.keys.CancelTenantDestruction(key_pb.CancelTenantDestructionRequest(tenant_id=TENANT))


def _during_tenant_listing(
    monkeypatch: pytest.MonkeyPatch, server: ServerHandle, meanwhile: Callable[[], None]
) -> None:
    """`meanwhile` runs once the destruction pass has listed the tenant's keys, before it destroys any."""
    store = server.running.store
    list_keys = store.list_keys
    pending = [meanwhile]

    def listing(query: KeyQuery) -> list[Key]:
        page = list_keys(query)
        if pending:
            pending.pop()()
        return page

    monkeypatch.setattr(store, "list_keys", listing)


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_tenant_cancellation_racing_its_destruction_is_refused(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    key_id = server.create_key(TENANT).key_id
    sealed = server.encrypt(TENANT, key_id, b"one").ciphertext
    _schedule_tenant(server)
    clock.advance(WAIT)
    refused: list[grpc.RpcError] = []

    def cancel() -> None:
        refused.append(expect_error(lambda: _cancel_tenant(server), FAILED, STATE))

    _during_tenant_listing(monkeypatch, server, cancel)
    assert _pass(server) == 1
    assert refused and "can no longer be cancelled" in (refused[0].details() or "")
    expect_error(lambda: server.decrypt(TENANT, sealed), FAILED, "ERROR_REASON_TENANT_DESTROYED")
    assert set(_states(server, key_id)) == {V.KEY_VERSION_STATE_DESTROYED}


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_tenant_cancellation_that_lands_during_the_pass_stops_it(
    start_server: StartServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A canceller whose clock trails the pass's (not yet due, to it) is acknowledged: the pass honours it."""
    clock = FakeClock()
    server = start_server(clock=clock)
    keys = [server.create_key(TENANT).key_id for _ in range(2)]
    sealed = [server.encrypt(TENANT, key_id, b"kept").ciphertext for key_id in keys]
    _schedule_tenant(server)
    clock.advance(WAIT)
    behind = start_server(clock=FakeClock(clock.now() - timedelta(seconds=1)))
    _during_tenant_listing(monkeypatch, server, lambda: _cancel_tenant(behind))
    assert _pass(server) == 0
    for ciphertext in sealed:
        assert server.decrypt(TENANT, ciphertext).plaintext == b"kept"
        assert start_server(clock=clock).decrypt(TENANT, ciphertext).plaintext == b"kept"
    for key_id in keys:
        assert set(_states(server, key_id)) == {V.KEY_VERSION_STATE_ENABLED}


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_key_failing_its_integrity_check_does_not_stop_its_tenant_being_shredded(
    start_server: StartServer,
) -> None:
    clock = FakeClock()
    server = start_server(clock=clock)
    altered, kept = (server.create_key(TENANT).key_id for _ in range(2))
    sealed = [server.encrypt(TENANT, key_id, b"one").ciphertext for key_id in (altered, kept)]
    materials = _wrapped(server, TENANT, kept)
    _schedule_tenant(server)
    db = sqlite3.connect(server.settings.data_dir / SqliteKeyStore.FILE_NAME)
    with db:  # someone with write access to the database: the key's tag no longer matches
        assert db.execute('UPDATE keys SET labels = \'{"x": "y"}\' WHERE key_id = ?', (altered,)).rowcount == 1
    db.close()
    clock.advance(WAIT)

    assert _pass(server) == 1  # the master key's version
    master = server.running.store.get_master_key(TENANT)
    assert master is not None and master.primary.destroyed and master.primary.wrapped_material == b""
    assert set(_states(server, kept)) == {V.KEY_VERSION_STATE_DESTROYED}
    _assert_erased(server, materials)
    expect_error(lambda: server.decrypt(TENANT, sealed[1]), FAILED, "ERROR_REASON_TENANT_DESTROYED")
    expect_error(lambda: server.decrypt(TENANT, sealed[0]), grpc.StatusCode.DATA_LOSS, "ERROR_REASON_KEY_INTEGRITY")
