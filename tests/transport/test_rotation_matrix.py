"""Acceptance 2: rotation, disable/enable and expiry against every ciphertext."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import BACKENDS, ServerHandle, StartServer, expect_error


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """One store unless a test names more: the matrix is the service's rules over versions and states, and each
    store's part (a version added by compare-and-set, a disabled flag written, the effective state) is proven on
    every store by tests/storage/test_contract.py. What needs the store end to end runs on more: the matrix across
    a restart on every backend, and a change to a cached key where the Redis cache holds a copy too."""
    name: str = getattr(request, "param", "embedded")
    return name


def _rotate(server: ServerHandle, tenant: str, key_id: str) -> resources_pb2.Key:
    return server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=tenant, key_id=key_id)).key


def test_every_version_decrypts_after_two_rotations_and_new_encryptions_use_the_primary(server: ServerHandle) -> None:
    key = server.create_key("t1")
    sealed = {1: server.encrypt("t1", key.key_id, b"v1", aad=b"a").ciphertext}
    for expected_version in (2, 3):
        rotated = _rotate(server, "t1", key.key_id)
        assert rotated.primary_version == expected_version
        assert [v.version for v in server.versions("t1", key.key_id)] == list(range(1, expected_version + 1))
        fresh = server.encrypt("t1", key.key_id, f"v{expected_version}".encode(), aad=b"a")
        assert fresh.key_version == expected_version
        sealed[expected_version] = fresh.ciphertext
    for version, ciphertext in sealed.items():
        opened = server.decrypt("t1", ciphertext, aad=b"a")
        assert opened.plaintext == f"v{version}".encode()
        assert opened.key_version == version
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key.key_id)).key
    assert got.primary_version == 3


def test_disabled_key_refuses_encrypt_and_decrypt_and_enabling_restores_both(server: ServerHandle) -> None:
    key = server.create_key("t1")
    ciphertext = server.encrypt("t1", key.key_id, b"secret").ciphertext
    disabled = server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=key.key_id)).key
    assert disabled.state == resources_pb2.KEY_STATE_DISABLED
    for call in (lambda: server.encrypt("t1", key.key_id, b"x"), lambda: server.decrypt("t1", ciphertext)):
        expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_DISABLED")
    expect_error(
        lambda: _rotate(server, "t1", key.key_id), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_DISABLED"
    )
    enabled = server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id="t1", key_id=key.key_id)).key
    assert enabled.state == resources_pb2.KEY_STATE_ENABLED
    assert server.decrypt("t1", ciphertext).plaintext == b"secret"
    assert server.decrypt("t1", server.encrypt("t1", key.key_id, b"y").ciphertext).plaintext == b"y"


def test_expired_key_refuses_encrypt_but_still_decrypts_and_rotation_renews_it(server: ServerHandle) -> None:
    key = server.create_key("t1", expire_after=Duration(seconds=3600))
    ciphertext = server.encrypt("t1", key.key_id, b"before expiry").ciphertext
    server.clock.advance(timedelta(hours=1))
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key.key_id)).key
    assert got.state == resources_pb2.KEY_STATE_EXPIRED
    assert got.versions[0].state == resources_pb2.KEY_VERSION_STATE_EXPIRED
    error = expect_error(
        lambda: server.encrypt("t1", key.key_id, b"x"), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_EXPIRED"
    )
    assert "rotate" in (error.details() or "")
    assert server.decrypt("t1", ciphertext).plaintext == b"before expiry"
    rotated = _rotate(server, "t1", key.key_id)
    assert rotated.state == resources_pb2.KEY_STATE_ENABLED
    assert rotated.versions[0].state == resources_pb2.KEY_VERSION_STATE_EXPIRED
    assert rotated.versions[1].state == resources_pb2.KEY_VERSION_STATE_ENABLED
    assert server.encrypt("t1", key.key_id, b"after").key_version == 2
    assert server.decrypt("t1", ciphertext).plaintext == b"before expiry"


def test_session_keys_expire_after_24_hours_by_default(server: ServerHandle) -> None:
    key = server.create_key("t1", resources_pb2.KEY_TYPE_SESSION)
    assert key.expires_at.ToDatetime() - key.created_at.ToDatetime() == timedelta(hours=24)
    server.clock.advance(timedelta(hours=23, minutes=59))
    server.encrypt("t1", key.key_id, b"still fine")
    server.clock.advance(timedelta(minutes=1))
    expect_error(
        lambda: server.encrypt("t1", key.key_id, b"x"), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_EXPIRED"
    )


def test_data_keys_default_to_365_days_and_a_90_day_rotation_period(server: ServerHandle) -> None:
    key = server.create_key("t1")
    assert key.expires_at.ToDatetime() - key.created_at.ToDatetime() == timedelta(days=365)
    assert key.rotation_period.ToTimedelta() == timedelta(days=90)
    assert key.versions[0].expires_at == key.expires_at


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"], indirect=True)
def test_disable_and_rotation_take_effect_immediately_for_a_cached_key(server: ServerHandle) -> None:
    key = server.create_key("t1")
    server.encrypt("t1", key.key_id, b"warm the cache")
    _rotate(server, "t1", key.key_id)
    assert server.encrypt("t1", key.key_id, b"x").key_version == 2
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=key.key_id))
    expect_error(
        lambda: server.encrypt("t1", key.key_id, b"x"), grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_DISABLED"
    )


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_rotation_matrix_holds_across_a_restart(start_server: StartServer) -> None:
    first = start_server()
    key = first.create_key("t1")
    sealed = [first.encrypt("t1", key.key_id, b"one").ciphertext]
    _rotate(first, "t1", key.key_id)
    sealed.append(first.encrypt("t1", key.key_id, b"two").ciphertext)
    first.stop()
    second = start_server()
    assert [second.decrypt("t1", c).plaintext for c in sealed] == [b"one", b"two"]
    assert second.encrypt("t1", key.key_id, b"three").key_version == 2
