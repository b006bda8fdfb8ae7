"""GenerateSessionKey and GetSessionKey: short-lived keys whose material goes to the caller."""

from __future__ import annotations

import os
import uuid
from datetime import timedelta

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, StartServer, expect_error


@pytest.fixture
def backend() -> str:
    """One store: the rules (lifetime, retry window, disabled and expired keys, who gets material) are the
    service's; each store's part (a session key read back as written and only for its tenant, a repeated key id
    refused, the effective state) is proven on every store by tests/storage/test_contract.py."""
    return "embedded"


def test_a_session_key_is_handed_out_once_created_and_fetched_while_valid(server: ServerHandle) -> None:
    created = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id="t1", labels={"room": "r-42"}))
    assert created.key.key_type == resources_pb2.KEY_TYPE_SESSION
    assert len(created.key_material) == 32
    assert created.key.expires_at.ToDatetime() - created.key.created_at.ToDatetime() == timedelta(hours=24)
    fetched = server.keys.GetSessionKey(key_pb.GetSessionKeyRequest(tenant_id="t1", key_id=created.key.key_id))
    assert fetched.key_material == created.key_material
    # The material is a usable AES-256-GCM key, the same for everyone who fetches it.
    nonce = os.urandom(12)
    AESGCM(fetched.key_material).decrypt(nonce, AESGCM(created.key_material).encrypt(nonce, b"frame", b""), b"")


def test_an_expired_session_key_is_refused(server: ServerHandle) -> None:
    created = server.keys.GenerateSessionKey(
        key_pb.GenerateSessionKeyRequest(tenant_id="t1", expire_after=Duration(seconds=600))
    )
    server.clock.advance(timedelta(minutes=10))
    expect_error(
        lambda: server.keys.GetSessionKey(key_pb.GetSessionKeyRequest(tenant_id="t1", key_id=created.key.key_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_EXPIRED",
    )


def test_only_session_keys_hand_out_material(server: ServerHandle) -> None:
    data = server.create_key("t1")
    error = expect_error(
        lambda: server.keys.GetSessionKey(key_pb.GetSessionKeyRequest(tenant_id="t1", key_id=data.key_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_TYPE_MISMATCH",
    )
    assert "not a session key" in (error.details() or "")


def test_another_tenant_cannot_fetch_a_session_key(server: ServerHandle) -> None:
    created = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id="t1"))
    expect_error(
        lambda: server.keys.GetSessionKey(key_pb.GetSessionKeyRequest(tenant_id="t2", key_id=created.key.key_id)),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_KEY_NOT_FOUND",
    )


def test_a_disabled_session_key_is_refused(server: ServerHandle) -> None:
    created = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id="t1"))
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=created.key.key_id))
    expect_error(
        lambda: server.keys.GetSessionKey(key_pb.GetSessionKeyRequest(tenant_id="t1", key_id=created.key.key_id)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_DISABLED",
    )


def test_the_maximum_session_lifetime_is_configurable(start_server: StartServer) -> None:
    server = start_server(max_session_key_lifetime_s=3600.0)
    error = expect_error(
        lambda: server.keys.GenerateSessionKey(
            key_pb.GenerateSessionKeyRequest(tenant_id="t1", expire_after=Duration(seconds=7200))
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "expire_after",
    )
    assert "3600s" in (error.details() or "")
    default = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id="t1")).key
    assert default.expires_at.ToDatetime() - default.created_at.ToDatetime() == timedelta(hours=1)


def test_a_repeated_generate_returns_the_same_key(server: ServerHandle) -> None:
    request = key_pb.GenerateSessionKeyRequest(tenant_id="t1", request_id="call-9")
    first = server.keys.GenerateSessionKey(request)
    again = server.keys.GenerateSessionKey(request)
    assert (again.key.key_id, again.key_material) == (first.key.key_id, first.key_material)


def test_a_replayed_generate_of_a_disabled_session_key_hands_out_nothing(server: ServerHandle) -> None:
    # The attack: replay the request id after the key was disabled, to get its material anyway.
    request = key_pb.GenerateSessionKeyRequest(tenant_id="t1", request_id="room:r-1:1")
    created = server.keys.GenerateSessionKey(request)
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=created.key.key_id))
    expect_error(
        lambda: server.keys.GenerateSessionKey(request),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_DISABLED",
    )


def test_a_replayed_generate_of_an_expired_session_key_hands_out_nothing(server: ServerHandle) -> None:
    request = key_pb.GenerateSessionKeyRequest(
        tenant_id="t1", request_id="room:r-1:1", expire_after=Duration(seconds=300)
    )
    server.keys.GenerateSessionKey(request)
    server.clock.advance(timedelta(minutes=5))
    expect_error(
        lambda: server.keys.GenerateSessionKey(request),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_EXPIRED",
    )


def test_a_request_id_replays_only_within_the_retry_window(server: ServerHandle) -> None:
    request = key_pb.GenerateSessionKeyRequest(tenant_id="t1", request_id="call-9")
    first = server.keys.GenerateSessionKey(request)
    server.clock.advance(timedelta(minutes=9))
    assert server.keys.GenerateSessionKey(request).key_material == first.key_material
    server.clock.advance(timedelta(minutes=2))
    error = expect_error(
        lambda: server.keys.GenerateSessionKey(request),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "request_id",
    )
    assert "GetSessionKey" in (error.details() or "")


def test_a_request_id_does_not_reveal_the_key_id_it_created(server: ServerHandle) -> None:
    """Key ids of idempotent creations are keyed with a server secret: from the request id alone (the
    old derivation was a public uuid5) nobody can compute the key id to fetch its material."""
    created = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id="t1", request_id="call-9"))
    public_derivation = uuid.uuid5(uuid.UUID("6f1c3c1e-8a55-4d0c-9d1e-7c0a4f5b2a10"), "t1\0call-9")
    assert created.key.key_id != str(public_derivation)
    assert uuid.UUID(created.key.key_id).version == 4
