"""What TokenSigner and AsyncTokenSigner share: the one verification error, bounds, and JOSE encodings."""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from crypto_client.models import Algorithm, PublicKey

JWT_ALGORITHM = {Algorithm.ED25519: "EdDSA", Algorithm.ECDSA_P256_SHA256: "ES256"}

# Bounds checked before any parsing: a token is an HTTP header, so anything larger is not one of ours.
MAX_TOKEN_CHARS = 16 * 1024
# A kid version is what the service numbers versions with (a uint32 over 0, ASCII digits only).
KID_VERSION = re.compile(r"[1-9][0-9]{0,9}")
MAX_KEY_VERSION = 2**32 - 1
# Every verification failure says the same thing, whatever the cause (kept as the exception's __cause__).
INVALID = "invalid token"


class InvalidTokenError(Exception):
    """The token is malformed, its signature does not verify, it has expired or is not yet valid, its
    audience or issuer is wrong, or its key (version) is unknown or refused. One error for all."""


@dataclass(frozen=True, slots=True)
class VerificationKey:
    jwt_algorithm: str  # the only `alg` a token of this key may name
    public_key: ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
    fetched_at: float


def verification_key(public: PublicKey, *, fetched_at: float) -> VerificationKey:
    """The service's PEM loaded, and checked to be the kind of key its algorithm says."""
    loaded = serialization.load_pem_public_key(public.pem.encode())
    if public.algorithm is Algorithm.ED25519 and isinstance(loaded, ed25519.Ed25519PublicKey):
        return VerificationKey("EdDSA", loaded, fetched_at)
    if (
        public.algorithm is Algorithm.ECDSA_P256_SHA256
        and isinstance(loaded, ec.EllipticCurvePublicKey)
        and isinstance(loaded.curve, ec.SECP256R1)
    ):
        return VerificationKey("ES256", loaded, fetched_at)
    raise InvalidTokenError(INVALID)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def numeric_date(claims: Mapping[str, Any], claim: str) -> float | None:
    """A claim that must be a JSON number (not a string, not a boolean) if present."""
    if claim not in claims:
        return None
    value = claims[claim]
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidTokenError(INVALID)
    return float(value)


def jose_signature(algorithm: Algorithm, signature: bytes) -> bytes:
    """JWS wants ES256 signatures as r || s (32 bytes each), not DER."""
    if algorithm is Algorithm.ECDSA_P256_SHA256:
        r, s = decode_dss_signature(signature)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return signature
