"""BatchEncrypt and BatchDecrypt: each item succeeds or fails on its own."""

from __future__ import annotations

import grpc
import pytest

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from tests.conftest import ServerHandle, StartServer, expect_error


@pytest.fixture
def backend() -> str:
    """One store: a batch is its items, each through the same use cases as Encrypt and Decrypt (which run on every
    backend in tests/transport/test_round_trip.py and test_rotation_matrix.py); the budget's reservations are
    proven on every store by tests/storage/test_contract.py and across replicas in test_usage_budget.py."""
    return "embedded"


def test_a_batch_of_1000_with_3_malformed_items_has_997_successes_and_3_invalid_arguments(
    server: ServerHandle,
) -> None:
    key = server.create_key("t1")
    items = [crypto_pb.BatchEncryptRequest.Item(key_id=key.key_id, plaintext=b"m%d" % i) for i in range(1000)]
    items[10].key_id = "not-a-key-id"
    items[500].aad = b"a" * 70_000
    items[999].plaintext = b"\0" * (1024 * 1024 + 1)
    response = server.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id="t1", items=items))
    assert len(response.results) == 1000
    failed = {i: r.error for i, r in enumerate(response.results) if r.HasField("error")}
    assert sorted(failed) == [10, 500, 999]
    for error in failed.values():
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert error.reason == "ERROR_REASON_INVALID_FIELD"
    assert [failed[i].metadata["field"] for i in (10, 500, 999)] == ["key_id", "aad", "plaintext"]
    sealed = [r for r in response.results if not r.HasField("error")]
    assert len(sealed) == 997
    decrypted = server.crypto.BatchDecrypt(
        crypto_pb.BatchDecryptRequest(
            tenant_id="t1", items=[crypto_pb.BatchDecryptRequest.Item(ciphertext=r.ciphertext) for r in sealed]
        )
    )
    expected = [b"m%d" % i for i in range(1000) if i not in failed]
    assert [r.plaintext for r in decrypted.results] == expected


def test_batch_decrypt_reports_each_failure_with_its_own_status(server: ServerHandle) -> None:
    key = server.create_key("t1")
    good = server.encrypt("t1", key.key_id, b"ok").ciphertext
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    disabled = server.create_key("t1")
    locked = server.encrypt("t1", disabled.key_id, b"locked").ciphertext
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=disabled.key_id))
    items = [
        crypto_pb.BatchDecryptRequest.Item(ciphertext=good),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=good[:-1]),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=locked),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=good, key_id="00000000-0000-4000-8000-000000000000"),
    ]
    results = server.crypto.BatchDecrypt(crypto_pb.BatchDecryptRequest(tenant_id="t1", items=items)).results
    assert results[0].plaintext == b"ok" and results[0].key_version == 1
    assert (results[1].error.code, results[1].error.reason) == (3, "ERROR_REASON_DECRYPTION_FAILED")
    assert (results[2].error.code, results[2].error.reason) == (9, "ERROR_REASON_KEY_DISABLED")
    assert (results[3].error.code, results[3].error.reason) == (5, "ERROR_REASON_KEY_NOT_FOUND")


def test_an_oversized_batch_is_invalid_argument_naming_the_limit(start_server: StartServer) -> None:
    server = start_server(max_batch_items=10)
    key = server.create_key("t1")
    items = [crypto_pb.BatchEncryptRequest.Item(key_id=key.key_id, plaintext=b"x")] * 11
    error = expect_error(
        lambda: server.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id="t1", items=items)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "items",
    )
    assert "limit of 10" in (error.details() or "")
    assert (
        len(server.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id="t1", items=items[:10])).results) == 10
    )


def test_a_batch_with_a_bad_tenant_fails_as_a_whole(server: ServerHandle) -> None:
    expect_error(
        lambda: server.crypto.BatchDecrypt(crypto_pb.BatchDecryptRequest(tenant_id="bad tenant")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "tenant_id",
    )


def test_a_batch_near_the_hard_limit_seals_exactly_the_uses_left_and_refuses_the_rest_per_item(
    start_server: StartServer,
) -> None:
    server = start_server(usage_soft_limit=5, usage_hard_limit=5, usage_flush_every=2, usage_flush_interval_s=0)
    limited = server.create_key("t1")
    other = server.create_key("t1")
    server.encrypt("t1", limited.key_id, b"first use")
    items = [
        crypto_pb.BatchEncryptRequest.Item(key_id=other.key_id if i % 3 == 0 else limited.key_id, plaintext=b"m%d" % i)
        for i in range(9)
    ]

    results = server.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id="t1", items=items)).results

    limited_results = [r for i, r in enumerate(results) if i % 3 != 0]
    assert [r.HasField("error") for r in limited_results] == [False] * 4 + [True] * 2, "4 uses were left"
    assert {r.error.reason for r in limited_results[4:]} == {"ERROR_REASON_KEY_VERSION_EXHAUSTED"}
    assert all(not results[i].HasField("error") and results[i].key_id == other.key_id for i in (0, 3, 6))
    opened = server.crypto.BatchDecrypt(
        crypto_pb.BatchDecryptRequest(
            tenant_id="t1",
            items=[crypto_pb.BatchDecryptRequest.Item(ciphertext=r.ciphertext) for r in results if r.ciphertext],
        )
    ).results
    assert [r.plaintext for r in opened] == [b"m%d" % i for i in (0, 1, 2, 3, 4, 5, 6)]


def test_batch_decrypt_checks_each_item_against_its_own_header_and_aad(server: ServerHandle) -> None:
    first = server.create_key("t1")
    second = server.create_key("t1")
    sealed = [server.encrypt("t1", k.key_id, b"x%d" % n, b"aad").ciphertext for n, k in enumerate((first, second))]
    forged = sealed[0][:17] + sealed[1][17:]  # the first key's id on the second key's ciphertext
    items = [
        crypto_pb.BatchDecryptRequest.Item(ciphertext=sealed[0], aad=b"aad"),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=sealed[0], aad=b"other"),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=forged, aad=b"aad"),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=sealed[1], aad=b"aad", key_id=first.key_id),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=sealed[1], aad=b"aad", key_id=second.key_id),
        crypto_pb.BatchDecryptRequest.Item(ciphertext=sealed[0], aad=b"a" * 70_000),
    ]
    results = server.crypto.BatchDecrypt(crypto_pb.BatchDecryptRequest(tenant_id="t1", items=items)).results
    assert (results[0].plaintext, results[0].key_id) == (b"x0", first.key_id)
    assert [r.error.reason for r in results[1:4]] == ["ERROR_REASON_DECRYPTION_FAILED"] * 3
    assert (results[4].plaintext, results[4].key_id) == (b"x1", second.key_id)
    assert (results[5].error.reason, results[5].error.metadata["field"]) == ("ERROR_REASON_INVALID_FIELD", "aad")
