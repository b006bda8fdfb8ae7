"""BlindIndex and TokenSigner against a real server; JWTs checked with PyJWT."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jwt
import pytest

from crypto_client import (
    Algorithm,
    BlindIndex,
    CryptoClient,
    DecryptionError,
    InvalidTokenError,
    KeyType,
    TokenSigner,
)
from tests.conftest import ServerHandle


@pytest.fixture
def crypto(faulty_server: ServerHandle) -> Iterator[CryptoClient]:
    with CryptoClient(faulty_server.address, "acme") as client:
        yield client


def test_blind_index_tokens_are_deterministic_per_tenant(faulty_server: ServerHandle, crypto: CryptoClient) -> None:
    index = BlindIndex(crypto, crypto.create_key(algorithm=Algorithm.HMAC_SHA256).key_id, field="email")
    assert index.token("Alice@Example.com") == index.token("  alice@example.com ")
    assert index.token("alice@example.com") != index.token("bob@example.com")
    assert len(bytes.fromhex(index.token("x"))) == 16
    with CryptoClient(faulty_server.address, "other-tenant") as other:
        other_index = BlindIndex(other, other.create_key(algorithm=Algorithm.HMAC_SHA256).key_id, field="email")
        assert other_index.token("alice@example.com") != index.token("alice@example.com")


def test_a_term_indexed_before_a_rotation_is_found_after_it(crypto: CryptoClient) -> None:
    key_id = crypto.create_key(algorithm=Algorithm.HMAC_SHA256).key_id
    index = BlindIndex(crypto, key_id)
    stored = {index.token("secret project"): "doc-1"}
    crypto.rotate_key(key_id)
    assert index.token("secret project") not in stored, "new documents use the new version"
    found = [stored[t] for t in index.query_tokens("secret project") if t in stored]
    assert found == ["doc-1"]


@pytest.mark.parametrize(
    ("algorithm", "jwt_algorithm"), [(Algorithm.ED25519, "EdDSA"), (Algorithm.ECDSA_P256_SHA256, "ES256")]
)
def test_tokens_verify_with_pyjwt_and_locally(crypto: CryptoClient, algorithm: Algorithm, jwt_algorithm: str) -> None:
    key_id = crypto.create_key(algorithm=algorithm).key_id
    signer = TokenSigner(crypto, key_id)
    token = signer.sign({"sub": "user-1", "exp": int(time.time()) + 60})
    public_pem = crypto.get_public_key(key_id).pem
    claims = jwt.decode(token, public_pem, algorithms=[jwt_algorithm])
    assert claims["sub"] == "user-1"
    assert jwt.get_unverified_header(token)["kid"] == f"{key_id}/1"
    assert signer.verify(token)["sub"] == "user-1"
    calls = crypto.stats().calls
    signer.verify(token)
    assert crypto.stats().calls == calls, "verification uses the cached public key"
    crypto.rotate_key(key_id)
    assert signer.verify(token)["sub"] == "user-1", "tokens signed before a rotation still verify"
    rotated = signer.sign({"sub": "user-2"})
    assert jwt.get_unverified_header(rotated)["kid"] == f"{key_id}/2"
    assert signer.verify(rotated)["sub"] == "user-2"


def test_forged_or_expired_tokens_are_rejected(crypto: CryptoClient) -> None:
    signer = TokenSigner(crypto, crypto.create_key(algorithm=Algorithm.ED25519).key_id)
    token = signer.sign({"sub": "user-1", "exp": 1000})
    with pytest.raises(InvalidTokenError):
        signer.verify(token)
    good = signer.sign({"sub": "user-1"})
    header, _, signature = good.split(".")
    forged_payload = jwt.utils.base64url_encode(b'{"sub":"admin"}').decode()
    for forged in (f"{header}.{forged_payload}.{signature}", good[:-2], "not.a.token", "x"):
        with pytest.raises(InvalidTokenError):
            signer.verify(forged)


def test_api_keys_are_sealed_for_their_owner(crypto: CryptoClient) -> None:
    signer = TokenSigner(
        crypto,
        crypto.create_key(algorithm=Algorithm.ED25519).key_id,
        api_key_id=crypto.create_key(KeyType.DATA).key_id,
    )
    sealed = signer.seal_api_key("owner-1", "sk_live_abc123")
    assert b"sk_live" not in sealed
    assert signer.open_api_key("owner-1", sealed) == "sk_live_abc123"
    with pytest.raises(DecryptionError):
        signer.open_api_key("owner-2", sealed)
