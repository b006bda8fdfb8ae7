"""ECDSA over P-256 with SHA-256 (DER signatures). The material is the private scalar, 32 bytes big-endian."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from crypto_server.domain.algorithms import MATERIAL_BYTES, SIGNER, VERIFIER, Algorithm, Builder, KeyManager
from crypto_server.domain.key_managers.public_keys import PublicKeyVerifier
from crypto_server.domain.keys import KeyType


def _private_key(material: bytes) -> ec.EllipticCurvePrivateKey:
    return ec.derive_private_key(int.from_bytes(material, "big"), ec.SECP256R1())


class EcdsaP256Signer:
    def __init__(self, material: bytes) -> None:
        self._private = _private_key(material)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message, ec.ECDSA(hashes.SHA256()))


def verifier(material: bytes) -> PublicKeyVerifier:
    public = _private_key(material).public_key()

    def check(signature: bytes, message: bytes) -> None:
        public.verify(signature, message, ec.ECDSA(hashes.SHA256()))

    return PublicKeyVerifier(public, check)


def new_material() -> bytes:
    """A scalar drawn by cryptography (uniform in [1, n)), not raw random bytes, which could exceed the order."""
    scalar = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value
    return scalar.to_bytes(MATERIAL_BYTES, "big")


MANAGER = KeyManager(
    algorithm=Algorithm.ECDSA_P256_SHA256,
    key_types=frozenset({KeyType.DATA}),
    new_material=new_material,
    builders=(Builder(SIGNER, EcdsaP256Signer), Builder(VERIFIER, verifier)),
)
