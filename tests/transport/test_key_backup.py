"""ExportKey / ImportKey over real gRPC: restores into another deployment decrypt old ciphertexts; altered
backups, wrong keys, existing keys and unsupported backup keys are refused with a clear reason."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import MappingProxyType
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa, x25519
from google.protobuf import duration_pb2, field_mask_pb2

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.key_backup import (
    FINGERPRINT_BYTES,
    BackupMetadata,
    BackupVersion,
    KeyBackup,
    seal_for_public_key,
)
from crypto_server.domain.keys import KeyPolicy, KeyType
from tests.conftest import ServerHandle, StartServer, error_info, expect_error
from tests.servers import SoftHsm

TENANT = "acme"
BACKUP_SERVICE_BACKENDS = ["embedded", "mongo+redis", "mongo+redis+hsm"]
PrivateKey = rsa.RSAPrivateKey | x25519.X25519PrivateKey


@pytest.fixture(params=BACKUP_SERVICE_BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def _private_pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem


def _public_pem(key: Any) -> str:
    pem: bytes = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem.decode()


def _new_backup_key(kind: str) -> PrivateKey:
    return rsa.generate_private_key(65537, 3072) if kind == "rsa" else x25519.X25519PrivateKey.generate()


@pytest.fixture
def write_private_key(tmp_path: Path) -> Callable[[Any], Path]:
    def write(key: Any) -> Path:
        path = tmp_path / f"backup-{os.urandom(4).hex()}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(_private_pem(key))
        return path

    return write


StartDeployment = Callable[..., ServerHandle]


@pytest.fixture
def other_deployment(
    start_server: StartServer, backend: str, backend_settings: dict[str, Any], tmp_path: Path
) -> StartDeployment:
    """A deployment of its own: another store (data directory or database, so another Redis namespace) and,
    unless `same_root_key`, another root key."""
    count = 0

    def start(*, same_root_key: bool = False, **overrides: Any) -> ServerHandle:
        nonlocal count
        count += 1
        settings: dict[str, Any] = {"data_dir": tmp_path / f"deployment-{count}"}
        if "mongodb_database" in backend_settings:
            settings["mongodb_database"] = f"{backend_settings['mongodb_database']}_d{count}"
        if not same_root_key:
            if "hsm" in backend:
                settings["pkcs11_key_label"] = SoftHsm.SECOND_LABEL
            else:
                settings["root_key"] = base64.b64encode(os.urandom(32)).decode()
        return start_server(**{**settings, **overrides})

    return start


def _export(server: ServerHandle, key_id: str, public_pem: str = "") -> bytes:
    request = key_pb.ExportKeyRequest(tenant_id=TENANT, key_id=key_id, backup_public_key=public_pem)
    backup: bytes = server.keys.ExportKey(request).backup
    return backup


def _import(server: ServerHandle, backup: bytes, tenant_id: str = TENANT) -> resources_pb2.Key:
    return server.keys.ImportKey(key_pb.ImportKeyRequest(tenant_id=tenant_id, backup=backup)).key


def _without_counts(key: resources_pb2.Key) -> resources_pb2.Key:
    """The key's description but its encryption counts (through the Redis cache, a source's can trail)."""
    copy = resources_pb2.Key()
    copy.CopyFrom(key)
    for version in copy.versions:
        version.encryptions = 0
    return copy


def _key_with_history(server: ServerHandle) -> tuple[resources_pb2.Key, dict[bytes, bytes]]:
    """A labelled data key with three versions and a ciphertext made with each (plaintext by ciphertext)."""
    key = server.create_key(
        TENANT,
        labels={"team": "media", "purpose": "backup-test"},
        rotation_period=duration_pb2.Duration(seconds=30 * 86400),
        expire_after=duration_pb2.Duration(seconds=400 * 86400),
    )
    made = {}
    for version in range(3):
        if version:
            server.clock.advance(timedelta(days=1))
            server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key.key_id))
        plaintext = f"made with version {version + 1}".encode()
        made[server.encrypt(TENANT, key.key_id, plaintext, aad=b"ctx").ciphertext] = plaintext
    assert server.running.budget is not None
    for _ in range(2):  # idle for a whole pass: the unused reservations go back, the stored counts are exact
        server.running.budget.flush()
    return server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key, made


@pytest.mark.parametrize("kind", ["rsa", "x25519"])
def test_a_restored_key_decrypts_old_ciphertexts_in_another_deployment(
    server: ServerHandle, other_deployment: StartDeployment, write_private_key: Callable[[Any], Path], kind: str
) -> None:
    key, made = _key_with_history(server)
    signing = server.create_key(TENANT, algorithm=resources_pb2.ALGORITHM_ED25519)
    signature = server.crypto.Sign(
        crypto_pb.SignRequest(tenant_id=TENANT, key_id=signing.key_id, message=b"m")
    ).signature
    backup_key = _new_backup_key(kind)
    backups = [_export(server, key_id, _public_pem(backup_key)) for key_id in (key.key_id, signing.key_id)]
    target = other_deployment(backup_private_key_file=write_private_key(backup_key))

    restored = _import(target, backups[0])
    _import(target, backups[1])

    assert _without_counts(restored) == _without_counts(key)  # id, versions, times, policy, labels, state
    # The counts the database held (one encryption per version), whatever a cache in front said.
    assert [version.encryptions for version in target.versions(TENANT, restored.key_id)] == [1, 1, 1]
    for ciphertext, plaintext in made.items():
        opened = target.decrypt(TENANT, ciphertext, aad=b"ctx")
        assert (opened.plaintext, opened.key_id) == (plaintext, key.key_id)
    assert target.crypto.Verify(
        crypto_pb.VerifyRequest(tenant_id=TENANT, key_id=signing.key_id, message=b"m", signature=signature)
    ).valid
    # It goes on as a key of the target: encrypts with its primary, rotates to version 4.
    assert target.encrypt(TENANT, key.key_id, b"new").key_version == 3
    rotated = target.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key
    assert rotated.primary_version == 4


def test_a_root_key_backup_restores_into_a_fresh_store_with_the_same_root_key(
    server: ServerHandle, other_deployment: StartDeployment
) -> None:
    key, made = _key_with_history(server)
    backup = _export(server, key.key_id)

    elsewhere = other_deployment()  # another root key
    error = expect_error(
        lambda: _import(elsewhere, backup), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_BACKUP_KEY_MISMATCH"
    )
    assert "root key" in (error.details() or "")

    fresh = other_deployment(same_root_key=True)
    assert _without_counts(_import(fresh, backup)) == _without_counts(key)
    for ciphertext, plaintext in made.items():
        assert fresh.decrypt(TENANT, ciphertext, aad=b"ctx").plaintext == plaintext


def test_restoring_over_an_existing_key_is_refused(server: ServerHandle, other_deployment: StartDeployment) -> None:
    key, made = _key_with_history(server)
    backup = _export(server, key.key_id)
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id=TENANT, key_id=key.key_id))

    error = expect_error(lambda: _import(server, backup), grpc.StatusCode.ALREADY_EXISTS, "ERROR_REASON_KEY_EXISTS")
    assert error_info(error).metadata["key_id"] == key.key_id
    # Nothing changed: the key is still disabled, not put back as it was in the backup.
    current = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key
    assert current.state == resources_pb2.KEY_STATE_DISABLED

    # A master key restores only into a tenant without one.
    (master,) = server.keys.ListKeys(
        key_pb.ListKeysRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_MASTER)
    ).keys
    master_backup = _export(server, master.key_id)
    fresh = other_deployment(same_root_key=True)
    fresh.create_key(TENANT)  # the tenant now has a master key of its own
    expect_error(lambda: _import(fresh, master_backup), grpc.StatusCode.ALREADY_EXISTS, "ERROR_REASON_KEY_EXISTS")
    empty = other_deployment(same_root_key=True)
    assert _import(empty, master_backup).key_id == master.key_id
    _import(empty, backup)
    (restored_master,) = empty.keys.ListKeys(
        key_pb.ListKeysRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_MASTER)
    ).keys
    assert restored_master.key_id == master.key_id
    empty.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    for ciphertext, plaintext in made.items():
        assert empty.decrypt(TENANT, ciphertext, aad=b"ctx").plaintext == plaintext


def test_a_backup_restores_only_into_its_own_tenant(server: ServerHandle, other_deployment: StartDeployment) -> None:
    key = server.create_key(TENANT)
    backup = _export(server, key.key_id)
    fresh = other_deployment(same_root_key=True)
    expect_error(
        lambda: _import(fresh, backup, tenant_id="globex"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "tenant_id",
    )


def test_a_backup_for_another_backup_key_is_refused(
    server: ServerHandle, other_deployment: StartDeployment, write_private_key: Callable[[Any], Path]
) -> None:
    key = server.create_key(TENANT)
    intended, held = x25519.X25519PrivateKey.generate(), x25519.X25519PrivateKey.generate()
    backup = _export(server, key.key_id, _public_pem(intended))
    targets = (
        other_deployment(backup_private_key_file=write_private_key(held)),
        other_deployment(backup_private_key_file=write_private_key(_new_backup_key("rsa"))),
        other_deployment(),  # no backup private key at all
    )
    for target in targets:
        with pytest.raises(grpc.RpcError) as caught:
            _import(target, backup)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert error_info(caught.value).reason == "ERROR_REASON_BACKUP_KEY_MISMATCH"
        assert "CRYPTO_BACKUP_PRIVATE_KEY_FILE" in (caught.value.details() or "")
        with pytest.raises(grpc.RpcError) as caught:
            target.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key.key_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    "public_key",
    [
        pytest.param(_public_pem(rsa.generate_private_key(65537, 2048)), id="rsa-2048"),
        pytest.param(_public_pem(rsa.generate_private_key(65537, 4096)), id="rsa-4096"),
        pytest.param(_public_pem(ec.generate_private_key(ec.SECP256R1())), id="ec-p256"),
        pytest.param(_public_pem(ed25519.Ed25519PrivateKey.generate()), id="ed25519"),
        pytest.param(_private_pem(x25519.X25519PrivateKey.generate()).decode(), id="a-private-key"),
        pytest.param("-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", id="garbage"),
    ],
)
@pytest.mark.parametrize("backend", ["embedded"])
def test_an_unsupported_backup_public_key_is_refused(server: ServerHandle, public_key: str) -> None:
    key = server.create_key(TENANT)
    error = expect_error(
        lambda: _export(server, key.key_id, public_key),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_BACKUP_KEY_UNSUPPORTED",
        "backup_public_key",
    )
    assert "RSA 3072 or X25519" in (error.details() or "")


def _expect_refused(target: ServerHandle, backup: bytes, reasons: set[str]) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        _import(target, backup)
    error = caught.value
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION), error.details()
    reason = error_info(error).reason
    assert reason in reasons, f"{reason}: {error.details()}"
    return reason


@pytest.mark.parametrize("wrapping", ["root", "rsa", "x25519"])
@pytest.mark.parametrize("backend", ["embedded"])
def test_every_altered_byte_of_a_backup_is_refused(
    server: ServerHandle,
    other_deployment: StartDeployment,
    write_private_key: Callable[[Any], Path],
    wrapping: str,
) -> None:
    """Every byte flipped (and every truncation, and a byte appended): refused, never INTERNAL, and nothing
    restored; then the intact backup restores. The format's fingerprint names the key that opens it, so a
    flip there reads as a backup for another key."""
    key = server.create_key(TENANT)  # one version, no labels: a small backup
    backup_key = _new_backup_key("rsa" if wrapping == "rsa" else "x25519")
    backup = _export(server, key.key_id, "" if wrapping == "root" else _public_pem(backup_key))
    target = other_deployment(same_root_key=True, backup_private_key_file=write_private_key(backup_key))
    fingerprint = range(10, 10 + FINGERPRINT_BYTES)
    malformed_or_tampered = {"ERROR_REASON_BACKUP_MALFORMED", "ERROR_REASON_BACKUP_TAMPERED"}

    seen = set()
    for index in range(len(backup)):
        for flip in (0x01, 0x80):
            altered = bytearray(backup)
            altered[index] ^= flip
            if index in fingerprint:
                _expect_refused(target, bytes(altered), {"ERROR_REASON_BACKUP_KEY_MISMATCH"})
            else:
                seen.add(_expect_refused(target, bytes(altered), malformed_or_tampered))
    assert seen == malformed_or_tampered
    for length in range(len(backup)):
        _expect_refused(target, backup[:length], malformed_or_tampered | {"ERROR_REASON_INVALID_FIELD"})
    _expect_refused(target, backup + b"\x00", {"ERROR_REASON_BACKUP_MALFORMED"})
    expect_error(
        lambda: target.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key.key_id)),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_KEY_NOT_FOUND",
    )
    assert _import(target, backup).key_id == key.key_id


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_backup_private_key_file_must_be_private_and_of_a_backup_key_type(
    start_server: StartServer, tmp_path: Path
) -> None:
    from crypto_server.config import ConfigError

    readable = tmp_path / "readable.pem"
    readable.write_bytes(_private_pem(x25519.X25519PrivateKey.generate()))
    readable.chmod(0o644)
    with pytest.raises(ConfigError, match="open to other users"):
        start_server(backup_private_key_file=readable)
    signing = tmp_path / "ed25519.pem"
    fd = os.open(signing, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(_private_pem(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(ConfigError, match=r"CRYPTO_BACKUP_PRIVATE_KEY_FILE.*RSA 3072 or X25519"):
        start_server(backup_private_key_file=signing)


def test_a_key_with_versions_scheduled_for_destruction_is_not_backed_up(server: ServerHandle) -> None:
    """A backup would keep what destruction is to erase; cancelling the destruction makes the key exportable."""
    key, _ = _key_with_history(server)
    schedule = key_pb.ScheduleKeyVersionDestructionRequest(tenant_id=TENANT, key_id=key.key_id, version=1)
    server.keys.ScheduleKeyVersionDestruction(schedule)
    expect_error(
        lambda: _export(server, key.key_id), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_VERSION_STATE"
    )
    server.keys.CancelKeyDestruction(key_pb.CancelKeyDestructionRequest(tenant_id=TENANT, key_id=key.key_id, version=1))
    assert _export(server, key.key_id)


def test_disabled_versions_and_min_decryption_version_survive_a_restore(
    server: ServerHandle, other_deployment: StartDeployment, write_private_key: Callable[[Any], Path]
) -> None:
    """A restored key must not decrypt with versions its operator had turned off."""
    key, made = _key_with_history(server)
    mask = field_mask_pb2.FieldMask(paths=["min_decryption_version"])
    server.keys.UpdateKey(
        key_pb.UpdateKeyRequest(tenant_id=TENANT, key_id=key.key_id, update_mask=mask, min_decryption_version=2)
    )
    server.keys.DisableKeyVersion(key_pb.DisableKeyVersionRequest(tenant_id=TENANT, key_id=key.key_id, version=2))
    key = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key
    assert key.min_decryption_version == 2
    assert server.versions(TENANT, key.key_id)[1].state == resources_pb2.KEY_VERSION_STATE_DISABLED
    backup_key = _new_backup_key("x25519")
    backup = _export(server, key.key_id, _public_pem(backup_key))
    target = other_deployment(backup_private_key_file=write_private_key(backup_key))

    restored = _import(target, backup)

    assert _without_counts(restored) == _without_counts(key)
    ciphertexts = list(made)
    for ciphertext in ciphertexts[:2]:  # below min_decryption_version; disabled
        expect_error(
            lambda c=ciphertext: target.decrypt(TENANT, c, aad=b"ctx"),  # type: ignore[misc]
            grpc.StatusCode.FAILED_PRECONDITION,
            "ERROR_REASON_KEY_VERSION_DISABLED",
        )
    assert target.decrypt(TENANT, ciphertexts[2], aad=b"ctx").plaintext == made[ciphertexts[2]]


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
def test_a_backup_of_format_version_1_still_restores(start_server: StartServer, tmp_path: Path) -> None:
    vector = json.loads((Path(__file__).parent.parent / "vectors" / "key_backup_v1.json").read_text())
    path = tmp_path / "backup-v1.pem"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(vector["backup_private_key_pem"])
    target = start_server(backup_private_key_file=path)

    restored = _import(target, base64.b64decode(vector["backup"]), vector["tenant_id"])

    assert (restored.key_id, restored.primary_version) == (vector["key_id"], vector["primary_version"])
    every = target.versions(vector["tenant_id"], restored.key_id)
    assert [v.version for v in every] == vector["versions"]
    assert {v.state for v in every} == {resources_pb2.KEY_VERSION_STATE_ENABLED}
    assert restored.min_decryption_version == 0
    opened = target.decrypt(vector["tenant_id"], base64.b64decode(vector["ciphertext"]))
    assert opened.plaintext == vector["plaintext"].encode()


def _crafted(tenant_id: str, **changes: Any) -> KeyBackup:
    """A backup as anyone holding the backup public key can make one: two versions, primary 2, unless changed."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    versions = changes.pop("versions", (BackupVersion(1, now, None, 0, None), BackupVersion(2, now, None, 0, None)))
    metadata = BackupMetadata(
        tenant_id=tenant_id,
        key_id=str(uuid.uuid4()),
        parent_key_id=None,
        key_type=changes.pop("key_type", KeyType.DATA),
        algorithm=Algorithm.AES_256_GCM,
        disabled=False,
        created_at=now,
        policy=changes.pop("policy", KeyPolicy(None, None)),
        labels=MappingProxyType({}),
        primary_version=changes.pop("primary_version", versions[-1].version),
        versions=versions,
        exported_at=now,
        min_decryption_version=changes.pop("min_decryption_version", 0),
    )
    assert not changes
    return KeyBackup(metadata, tuple(os.urandom(32) for _ in versions))


_NOW = datetime(2026, 1, 1, tzinfo=UTC)
CRAFTED = {
    "primary below the latest version": {"primary_version": 1},
    "a gap in the version numbers": {
        "versions": (BackupVersion(1, _NOW, None, 0, None), BackupVersion(3, _NOW, None, 0, None))
    },
    "versions not starting at 1": {"versions": (BackupVersion(2, _NOW, None, 0, None),)},
    "a version lifetime CreateKey refuses": {"policy": KeyPolicy(timedelta(seconds=1), None)},
    "a rotation period CreateKey refuses": {"policy": KeyPolicy(None, timedelta(days=365 * 1000))},
    "an invalid request id": {
        "versions": (BackupVersion(1, _NOW, None, 0, "no spaces allowed"), BackupVersion(2, _NOW, None, 0, None))
    },
    "a request id used twice": {
        "versions": (BackupVersion(1, _NOW, None, 0, "same"), BackupVersion(2, _NOW, None, 0, "same"))
    },
    "a disabled primary version": {
        "versions": (BackupVersion(1, _NOW, None, 0, None), BackupVersion(2, _NOW, None, 0, None, disabled=True))
    },
    "min_decryption_version above the primary": {"min_decryption_version": 3},
    "a master key with a disabled version": {
        "key_type": KeyType.MASTER,
        "versions": (BackupVersion(1, _NOW, None, 0, None, disabled=True), BackupVersion(2, _NOW, None, 0, None)),
    },
}


@pytest.mark.parametrize("backend", ["embedded"], indirect=True)
@pytest.mark.parametrize("shape", list(CRAFTED))
def test_a_crafted_backup_of_a_shape_the_service_never_makes_is_refused(
    start_server: StartServer, write_private_key: Callable[[Any], Path], shape: str
) -> None:
    backup_key = x25519.X25519PrivateKey.generate()
    server = start_server(backup_private_key_file=write_private_key(backup_key))
    server.create_key(TENANT)
    blob = seal_for_public_key(_crafted(TENANT, **CRAFTED[shape]), backup_key.public_key())

    expect_error(
        lambda: _import(server, blob), grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "backup"
    )

    # Nothing was stored that would fail its integrity check on every read after.
    assert len(server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT)).keys) == 2  # master and data key
