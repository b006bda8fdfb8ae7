"""Bad input gets INVALID_ARGUMENT naming the field — never INTERNAL, never a crashed worker."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, expect_error

VALID_UUID = "00000000-0000-4000-8000-000000000000"
BAD_TENANTS = ["", "-starts-with-dash", "has space", "x" * 65, "tenant/../other", "ünïcode", "a\nb"]


@pytest.fixture
def backend() -> str:
    """One store: input is validated before any store is asked. What the stores do with what passes (a missing
    key is None, a 64-character tenant id reads back) is proven on every store by tests/storage/test_contract.py
    and test_contract_extra.py."""
    return "embedded"


@pytest.mark.parametrize("tenant", BAD_TENANTS)
def test_malformed_tenant_id_is_rejected_by_every_rpc(server: ServerHandle, tenant: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: server.create_key(tenant),
        lambda: server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=tenant, key_id=VALID_UUID)),
        lambda: server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=tenant)),
        lambda: server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=tenant, key_id=VALID_UUID)),
        lambda: server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id=tenant, key_id=VALID_UUID)),
        lambda: server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id=tenant, key_id=VALID_UUID)),
        lambda: server.encrypt(tenant, VALID_UUID, b"x"),
        lambda: server.decrypt(tenant, b"x" * 64),
    ]
    for call in calls:
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "tenant_id")


def test_tenant_id_of_64_allowed_characters_is_accepted(server: ServerHandle) -> None:
    tenant = "T" + "a1_.-" * 12 + "xyz"
    assert len(tenant) == 64
    assert server.create_key(tenant).tenant_id == tenant


@pytest.mark.parametrize(
    "key_id", ["", "not-a-uuid", "0000000A-0000-4000-8000-00000000000B", "{" + VALID_UUID + "}", VALID_UUID + "0"]
)
def test_malformed_key_id_is_rejected(server: ServerHandle, key_id: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key_id)),
        lambda: server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key_id)),
        lambda: server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=key_id)),
        lambda: server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id="t1", key_id=key_id)),
        lambda: server.encrypt("t1", key_id, b"x"),
    ]
    for call in calls:
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "key_id")


def test_malformed_key_id_on_decrypt_is_rejected(server: ServerHandle) -> None:
    expect_error(
        lambda: server.decrypt("t1", b"x" * 64, key_id="nope"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "key_id",
    )


@pytest.mark.parametrize("key_type", [resources_pb2.KEY_TYPE_UNSPECIFIED, 4, 99, -1])
def test_unknown_or_missing_key_type_is_rejected(server: ServerHandle, key_type: int) -> None:
    expect_error(
        lambda: server.create_key("t1", key_type),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "key_type",
    )


def test_unknown_filter_enums_are_rejected(server: ServerHandle) -> None:
    expect_error(
        lambda: server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1", key_type=42)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "key_type",
    )
    expect_error(
        lambda: server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1", state=42)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "state",
    )


@pytest.mark.parametrize(
    ("field", "duration", "key_type"),
    [
        ("expire_after", Duration(seconds=0), resources_pb2.KEY_TYPE_DATA),
        ("expire_after", Duration(seconds=-5), resources_pb2.KEY_TYPE_DATA),
        ("expire_after", Duration(seconds=59), resources_pb2.KEY_TYPE_DATA),
        ("expire_after", Duration(seconds=8 * 86400), resources_pb2.KEY_TYPE_SESSION),
        ("expire_after", Duration(seconds=315_576_000_000), resources_pb2.KEY_TYPE_DATA),
        ("rotation_period", Duration(seconds=60), resources_pb2.KEY_TYPE_DATA),
        ("rotation_period", Duration(seconds=-1, nanos=-5), resources_pb2.KEY_TYPE_DATA),
    ],
)
def test_out_of_range_durations_are_rejected(
    server: ServerHandle, field: str, duration: Duration, key_type: int
) -> None:
    expect_error(
        lambda: server.create_key("t1", key_type, **{field: duration}),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        field,
    )


@pytest.mark.parametrize(
    "labels",
    [{"Upper": "x"}, {"": "x"}, {"9starts-with-digit": "x"}, {"ok": "v" * 257}, {f"l{i}": "x" for i in range(65)}],
)
def test_bad_labels_are_rejected(server: ServerHandle, labels: dict[str, str]) -> None:
    expect_error(
        lambda: server.create_key("t1", labels=labels),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "labels",
    )


def test_aad_over_64_kib_is_rejected(server: ServerHandle) -> None:
    key = server.create_key("t1")
    server.encrypt("t1", key.key_id, b"x", aad=b"a" * 65536)
    for call in (
        lambda: server.encrypt("t1", key.key_id, b"x", aad=b"a" * 65537),
        lambda: server.decrypt("t1", b"x" * 64, aad=b"a" * 65537),
    ):
        expect_error(call, grpc.StatusCode.INVALID_ARGUMENT, "ERROR_REASON_INVALID_FIELD", "aad")


@pytest.mark.parametrize("page_size", [-1, 1001, 2**31 - 1])
def test_page_size_out_of_range_is_rejected(server: ServerHandle, page_size: int) -> None:
    expect_error(
        lambda: server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1", page_size=page_size)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "page_size",
    )


@pytest.mark.parametrize(
    "token", ["garbage", "!!!", "eyJ2IjoyfQ", "e30", "x" * 5000, "eyJ2IjoxLCJjcmVhdGVkX3VzIjoxZTMwMH0"]
)
def test_garbage_page_token_is_rejected(server: ServerHandle, token: str) -> None:
    expect_error(
        lambda: server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1", page_token=token)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "page_token",
    )


def test_a_request_body_that_does_not_parse_is_invalid_argument(server: ServerHandle) -> None:
    raw: grpc.UnaryUnaryMultiCallable[bytes, bytes] = server.channel.unary_unary(
        "/caas.crypto.v1.CryptoService/Encrypt", request_serializer=None, response_deserializer=None
    )
    for body in (b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\xff\xff\xff\xff\x0f", b"\x0a\x02\xff\xfe"):
        expect_error(
            lambda body=body: raw(body),  # type: ignore[misc]
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
            "request",
        )


def test_the_server_keeps_serving_after_bad_input(server: ServerHandle) -> None:
    for tenant in BAD_TENANTS:
        with pytest.raises(grpc.RpcError):
            server.create_key(tenant)
    key = server.create_key("t1")
    assert server.decrypt("t1", server.encrypt("t1", key.key_id, b"ok").ciphertext).plaintext == b"ok"


def test_missing_key_is_not_found_naming_the_key(server: ServerHandle) -> None:
    error = expect_error(
        lambda: server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=VALID_UUID)),
        grpc.StatusCode.NOT_FOUND,
        "ERROR_REASON_KEY_NOT_FOUND",
    )
    assert VALID_UUID in (error.details() or "")


def test_errors_never_echo_plaintext_or_aad(server: ServerHandle) -> None:
    key = server.create_key("t1")
    secret = b"SECRET-PLAINTEXT-MARKER"
    for call in (
        lambda: server.encrypt("t1", key.key_id, secret * 50000, aad=b"SECRET-AAD-MARKER"),
        lambda: server.decrypt("t1", secret * 4, aad=b"SECRET-AAD-MARKER"),
        lambda: server.crypto.Encrypt(crypto_pb.EncryptRequest(tenant_id="t1", key_id=VALID_UUID, plaintext=secret)),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            call()
        assert "SECRET" not in (caught.value.details() or "")
        assert b"SECRET" not in b"".join(
            value if isinstance(value, bytes) else value.encode()
            for _, value in cast("list[tuple[str, str | bytes]]", caught.value.trailing_metadata())
        )
