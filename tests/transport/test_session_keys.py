"""GenerateSessionKey and GetSessionKey: short-lived keys whose material goes to the caller."""

from __future__ import annotations

import os
from datetime import timedelta

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, StartServer, expect_error


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
