"""BatchEncrypt and BatchDecrypt: each item succeeds or fails on its own."""

from __future__ import annotations

import grpc

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from tests.conftest import ServerHandle, StartServer, expect_error


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
