"""Key algorithms: HMAC-SHA256 MACs and Ed25519 / ECDSA P-256 signatures, checked with independent code."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable
from datetime import timedelta

import grpc
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf.duration_pb2 import Duration

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle, expect_error
from tests.unwrap import unwrapped_material

HMAC = resources_pb2.ALGORITHM_HMAC_SHA256
ED25519 = resources_pb2.ALGORITHM_ED25519
ECDSA = resources_pb2.ALGORITHM_ECDSA_P256_SHA256


@pytest.fixture
def backend() -> str:
    """One store: MACs and signatures are computed from the key's material once loaded, whatever store held it;
    each store keeps a key's algorithm, versions and state as written (tests/storage/test_contract.py,
    test_contract_extra.py), and the key hierarchy under a file or HSM root key runs on every backend in
    tests/transport/test_round_trip.py and test_key_hierarchy.py."""
    return "embedded"


def _mac(server: ServerHandle, key_id: str, data: bytes, version: int = 0) -> crypto_pb.ComputeMacResponse:
    return server.crypto.ComputeMac(
        crypto_pb.ComputeMacRequest(tenant_id="t1", key_id=key_id, data=data, key_version=version)
    )


def _verify_mac(server: ServerHandle, key_id: str, data: bytes, mac: bytes, version: int) -> bool:
    request = crypto_pb.VerifyMacRequest(tenant_id="t1", key_id=key_id, data=data, mac=mac, key_version=version)
    return server.crypto.VerifyMac(request).valid


def test_a_mac_verifies_and_a_forgery_does_not(server: ServerHandle) -> None:
    key = server.create_key("t1", algorithm=HMAC)
    assert key.algorithm == HMAC
    computed = _mac(server, key.key_id, b"term:alice")
    assert len(computed.mac) == 32 and computed.key_version == 1
    assert _verify_mac(server, key.key_id, b"term:alice", computed.mac, 1)
    assert not _verify_mac(server, key.key_id, b"term:alicf", computed.mac, 1)
    forged = bytes([computed.mac[0] ^ 1]) + computed.mac[1:]
    assert not _verify_mac(server, key.key_id, b"term:alice", forged, 1)
    assert not _verify_mac(server, key.key_id, b"term:alice", computed.mac[:16], 1)


def test_the_mac_is_hmac_sha256_as_pythons_hmac_computes_it(server: ServerHandle) -> None:
    created = server.create_key("t1", algorithm=HMAC)
    stored = server.running.store.get_key("t1", created.key_id)
    assert stored is not None
    (material,) = unwrapped_material(server, stored)
    expected = hmac.new(material, b"term:alice", hashlib.sha256).digest()
    assert hmac.compare_digest(_mac(server, created.key_id, b"term:alice").mac, expected)


def test_macs_of_every_version_stay_verifiable_after_rotation(server: ServerHandle) -> None:
    key = server.create_key("t1", algorithm=HMAC)
    old = _mac(server, key.key_id, b"term")
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    new = _mac(server, key.key_id, b"term")
    assert new.key_version == 2 and new.mac != old.mac
    assert _verify_mac(server, key.key_id, b"term", old.mac, 1)
    assert _mac(server, key.key_id, b"term", version=1).mac == old.mac, "older versions still compute (for lookups)"


@pytest.mark.parametrize("algorithm", [ED25519, ECDSA])
def test_signatures_verify_with_cryptography_and_the_public_key(server: ServerHandle, algorithm: int) -> None:
    key = server.create_key("t1", algorithm=algorithm)
    signed = server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=key.key_id, message=b"payload"))
    assert signed.algorithm == algorithm and signed.key_version == 1
    pem = server.crypto.GetPublicKey(crypto_pb.GetPublicKeyRequest(tenant_id="t1", key_id=key.key_id)).pem
    public = serialization.load_pem_public_key(pem.encode())
    if algorithm == ED25519:
        assert isinstance(public, ed25519.Ed25519PublicKey)
        public.verify(signed.signature, b"payload")
        with pytest.raises(InvalidSignature):
            public.verify(signed.signature, b"other")
    else:
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp256r1"
        public.verify(signed.signature, b"payload", ec.ECDSA(hashes.SHA256()))
        with pytest.raises(InvalidSignature):
            public.verify(signed.signature, b"other", ec.ECDSA(hashes.SHA256()))
    verify = crypto_pb.VerifyRequest(
        tenant_id="t1", key_id=key.key_id, message=b"payload", signature=signed.signature, key_version=1
    )
    assert server.crypto.Verify(verify).valid
    verify.message = b"tampered"
    assert not server.crypto.Verify(verify).valid


@pytest.mark.parametrize("algorithm", [ED25519, ECDSA])
def test_rotation_keeps_old_public_keys_and_signatures_valid(server: ServerHandle, algorithm: int) -> None:
    key = server.create_key("t1", algorithm=algorithm)
    old = server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=key.key_id, message=b"m"))
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id))
    new = server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=key.key_id, message=b"m"))
    assert new.key_version == 2
    pems = {
        v: server.crypto.GetPublicKey(
            crypto_pb.GetPublicKeyRequest(tenant_id="t1", key_id=key.key_id, key_version=v)
        ).pem
        for v in (1, 2)
    }
    assert pems[1] != pems[2]
    for signed in (old, new):
        request = crypto_pb.VerifyRequest(
            tenant_id="t1", key_id=key.key_id, message=b"m", signature=signed.signature, key_version=signed.key_version
        )
        assert server.crypto.Verify(request).valid


def test_wrong_algorithm_is_failed_precondition_naming_both(server: ServerHandle) -> None:
    aes = server.create_key("t1")
    mac_key = server.create_key("t1", algorithm=HMAC)
    signer = server.create_key("t1", algorithm=ED25519)
    cases = [
        (lambda: server.encrypt("t1", mac_key.key_id, b"x"), "HMAC_SHA256", "AES_256_GCM"),
        (lambda: _mac(server, aes.key_id, b"x"), "AES_256_GCM", "HMAC_SHA256"),
        (
            lambda: server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=mac_key.key_id, message=b"x")),
            "HMAC_SHA256",
            "ED25519",
        ),
        (
            lambda: server.crypto.GenerateDataKey(
                crypto_pb.GenerateDataKeyRequest(tenant_id="t1", key_id=signer.key_id)
            ),
            "ED25519",
            "AES_256_GCM",
        ),
    ]
    for call, has, needs in cases:
        error = expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_ALGORITHM_MISMATCH")
        assert has in (error.details() or "") and needs in (error.details() or "")


def test_only_data_keys_choose_an_algorithm(server: ServerHandle) -> None:
    for key_type in (resources_pb2.KEY_TYPE_MASTER, resources_pb2.KEY_TYPE_SESSION):
        expect_error(
            lambda key_type=key_type: server.create_key("t1", key_type, algorithm=HMAC),  # type: ignore[misc]
            grpc.StatusCode.INVALID_ARGUMENT,
            "ERROR_REASON_INVALID_FIELD",
            "algorithm",
        )
    expect_error(
        lambda: server.create_key("t1", algorithm=42),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "algorithm",
    )


def test_an_expired_signing_key_refuses_to_sign_but_still_verifies(server: ServerHandle) -> None:
    key = server.create_key("t1", algorithm=ECDSA, expire_after=Duration(seconds=3600))
    signed = server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=key.key_id, message=b"m"))
    server.clock.advance(timedelta(hours=1))
    expect_error(
        lambda: server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=key.key_id, message=b"m")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_EXPIRED",
    )
    request = crypto_pb.VerifyRequest(
        tenant_id="t1", key_id=key.key_id, message=b"m", signature=signed.signature, key_version=1
    )
    assert server.crypto.Verify(request).valid


@pytest.mark.parametrize("named_version", [0, 1], ids=["primary", "explicit-version"])
def test_an_expired_mac_version_computes_no_new_macs_but_still_verifies(
    server: ServerHandle, named_version: int
) -> None:
    # The attack: name the expired primary explicitly to get a new MAC out of it.
    key = server.create_key("t1", algorithm=HMAC, expire_after=Duration(seconds=3600))
    made = _mac(server, key.key_id, b"term")
    server.clock.advance(timedelta(hours=1))
    expect_error(
        lambda: _mac(server, key.key_id, b"term", version=named_version),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_KEY_EXPIRED",
    )
    assert _verify_mac(server, key.key_id, b"term", made.mac, 1)


def test_an_unknown_version_is_invalid_argument(server: ServerHandle) -> None:
    key = server.create_key("t1", algorithm=HMAC)
    expect_error(
        lambda: _mac(server, key.key_id, b"x", version=7),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        "key_version",
    )


@pytest.mark.parametrize("algorithm", [HMAC, ED25519, ECDSA])
def test_a_disabled_mac_or_signing_key_refuses_every_operation_until_enabled(
    server: ServerHandle, algorithm: int
) -> None:
    key = server.create_key("t1", algorithm=algorithm)
    if algorithm == HMAC:
        made = _mac(server, key.key_id, b"x").mac
        calls: list[Callable[[], object]] = [
            lambda: _mac(server, key.key_id, b"x"),
            lambda: _verify_mac(server, key.key_id, b"x", made, 1),
        ]
    else:
        made = server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=key.key_id, message=b"x")).signature
        verify = crypto_pb.VerifyRequest(tenant_id="t1", key_id=key.key_id, message=b"x", signature=made, key_version=1)
        calls = [
            lambda: server.crypto.Sign(crypto_pb.SignRequest(tenant_id="t1", key_id=key.key_id, message=b"x")),
            lambda: server.crypto.Verify(verify),
            lambda: server.crypto.GetPublicKey(crypto_pb.GetPublicKeyRequest(tenant_id="t1", key_id=key.key_id)),
        ]
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=key.key_id))
    for call in calls:
        expect_error(call, grpc.StatusCode.FAILED_PRECONDITION, "ERROR_REASON_KEY_DISABLED")
    server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id="t1", key_id=key.key_id))
    for call in calls:
        call()
