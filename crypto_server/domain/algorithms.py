"""What each key algorithm's material is, and the primitives built from it (all from `cryptography`).

Every algorithm's material is 32 bytes, so every key wraps the same way:
AES-256-GCM and HMAC-SHA256 keys are 32 random bytes; an Ed25519 key is its
32-byte private seed; an ECDSA P-256 key is its private scalar, big-endian.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

MATERIAL_BYTES = 32


class Algorithm(enum.Enum):
    AES_256_GCM = "AES_256_GCM"
    HMAC_SHA256 = "HMAC_SHA256"
    ED25519 = "ED25519"
    ECDSA_P256_SHA256 = "ECDSA_P256_SHA256"

    @property
    def signs(self) -> bool:
        return self in (Algorithm.ED25519, Algorithm.ECDSA_P256_SHA256)


def new_material(algorithm: Algorithm) -> bytes:
    """Fresh key material from the operating system's CSPRNG (via cryptography for ECDSA)."""
    if algorithm is Algorithm.ECDSA_P256_SHA256:
        scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
        return scalar.to_bytes(MATERIAL_BYTES, "big")
    return os.urandom(MATERIAL_BYTES)


SigningKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def signing_key(algorithm: Algorithm, material: bytes) -> SigningKey:
    if algorithm is Algorithm.ED25519:
        return ed25519.Ed25519PrivateKey.from_private_bytes(material)
    if algorithm is Algorithm.ECDSA_P256_SHA256:
        return ec.derive_private_key(int.from_bytes(material, "big"), ec.SECP256R1())
    raise ValueError(f"{algorithm.value} does not sign")


def sign(key: SigningKey, message: bytes) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(message)
    return key.sign(message, ec.ECDSA(hashes.SHA256()))


def verify(key: SigningKey, message: bytes, signature: bytes) -> bool:
    try:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            key.public_key().verify(signature, message)
        else:
            key.public_key().verify(signature, message, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True


def public_key_pem(key: SigningKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def compute_mac(material: bytes, data: bytes) -> bytes:
    return hmac.new(material, data, hashlib.sha256).digest()


def mac_matches(material: bytes, data: bytes, mac: bytes) -> bool:
    """Constant-time comparison, so timing reveals nothing about how much of a forged MAC was right."""
    return hmac.compare_digest(compute_mac(material, data), mac)
