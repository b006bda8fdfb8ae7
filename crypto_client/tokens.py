"""TokenSigner: JWTs (EdDSA with Ed25519 keys, ES256 with ECDSA P-256 keys) signed by the service.

The private key never leaves the service. Verification is local: the public
key of each (key, version) is fetched once and cached, so verifying a token on
the gateway's hot path costs no call. A token's `kid` header is
"<key id>/<version>", so tokens signed before a rotation keep verifying.

API keys for storage: `seal_api_key` / `open_api_key` encrypt them under an
AES key, bound to their owner, so a sealed key copied to another owner does
not open.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Mapping
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from crypto_client.models import Algorithm
from crypto_client.sync_client import CryptoClient

_JWT_ALGORITHM = {Algorithm.ED25519: "EdDSA", Algorithm.ECDSA_P256_SHA256: "ES256"}


class InvalidTokenError(Exception):
    """The token is malformed, its signature does not verify, or it has expired. One error for all."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class TokenSigner:
    def __init__(self, client: CryptoClient, signing_key_id: str, *, api_key_id: str | None = None) -> None:
        self._client = client
        self._key_id = signing_key_id
        self._api_key_id = api_key_id
        self._public_keys: dict[tuple[str, int], Any] = {}
        self._lock = threading.Lock()

    def sign(self, claims: Mapping[str, Any]) -> str:
        """A compact JWT of `claims`, signed with the key's primary version."""
        key = self._client.get_key(self._key_id)
        if key.algorithm not in _JWT_ALGORITHM:
            raise ValueError(f"key {self._key_id} is {key.algorithm.value}; JWTs need ED25519 or ECDSA_P256_SHA256")
        payload = _b64(json.dumps(dict(claims), separators=(",", ":")).encode())
        version = key.primary_version
        for _ in range(3):  # the primary may move under us (a rotation); re-sign with the right kid
            header = {"alg": _JWT_ALGORITHM[key.algorithm], "typ": "JWT", "kid": f"{self._key_id}/{version}"}
            signing_input = f"{_b64(json.dumps(header, separators=(',', ':')).encode())}.{payload}"
            signed = self._client.sign(self._key_id, signing_input.encode())
            if signed.key_version == version:
                return f"{signing_input}.{_b64(_jose_signature(signed.algorithm, signed.signature))}"
            version = signed.key_version
        raise RuntimeError("the signing key kept rotating while signing")

    def verify(self, token: str, *, now: float | None = None) -> dict[str, Any]:
        """The claims of a token this service signed; raises InvalidTokenError otherwise (checks `exp`/`nbf`)."""
        try:
            header_b64, payload_b64, signature_b64 = token.split(".")
            header = json.loads(_unb64(header_b64))
            key_id, version_text = str(header["kid"]).rsplit("/", 1)
            public = self._public_key(key_id, int(version_text))
            signature = _unb64(signature_b64)
            signing_input = f"{header_b64}.{payload_b64}".encode()
            if header.get("alg") == "EdDSA" and isinstance(public, ed25519.Ed25519PublicKey):
                public.verify(signature, signing_input)
            elif header.get("alg") == "ES256" and isinstance(public, ec.EllipticCurvePublicKey):
                if len(signature) != 64:
                    raise InvalidTokenError("bad signature length")
                der = encode_dss_signature(int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big"))
                public.verify(der, signing_input, ec.ECDSA(hashes.SHA256()))
            else:
                raise InvalidTokenError("algorithm does not match the key")
            claims: dict[str, Any] = json.loads(_unb64(payload_b64))
        except (ValueError, KeyError, TypeError, InvalidSignature) as error:
            raise InvalidTokenError("invalid token") from error
        moment = time.time() if now is None else now
        if "exp" in claims and moment >= float(claims["exp"]):
            raise InvalidTokenError("invalid token")
        if "nbf" in claims and moment < float(claims["nbf"]):
            raise InvalidTokenError("invalid token")
        return claims

    def _public_key(self, key_id: str, version: int) -> Any:
        if key_id != self._key_id:
            raise InvalidTokenError("token was signed with another key")
        with self._lock:
            cached = self._public_keys.get((key_id, version))
        if cached is None:
            pem = self._client.get_public_key(key_id, key_version=version).pem
            cached = serialization.load_pem_public_key(pem.encode())
            with self._lock:
                self._public_keys[(key_id, version)] = cached
        return cached

    # -- API keys at rest ---------------------------------------------------------------------

    def seal_api_key(self, owner_id: str, api_key: str) -> bytes:
        return self._client.encrypt(self._api_key(), api_key.encode(), aad=self._owner_aad(owner_id)).ciphertext

    def open_api_key(self, owner_id: str, sealed: bytes) -> str:
        return self._client.decrypt(sealed, aad=self._owner_aad(owner_id)).plaintext.decode()

    def _api_key(self) -> str:
        if self._api_key_id is None:
            raise ValueError("TokenSigner(api_key_id=...) names the AES key for API keys")
        return self._api_key_id

    @staticmethod
    def _owner_aad(owner_id: str) -> bytes:
        return b"caas.gateway.api-key.v1\x00" + owner_id.encode()


def _jose_signature(algorithm: Algorithm, signature: bytes) -> bytes:
    """JWS wants ES256 signatures as r || s (32 bytes each), not DER."""
    if algorithm is Algorithm.ECDSA_P256_SHA256:
        r, s = decode_dss_signature(signature)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signature
