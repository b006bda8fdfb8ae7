"""Ed25519 signatures. The material is the 32-byte private seed."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import ed25519

from crypto_server.domain.algorithms import SIGNER, VERIFIER, Algorithm, Builder, KeyManager, random_material
from crypto_server.domain.key_managers.public_keys import PublicKeyVerifier
from crypto_server.domain.keys import KeyType


class Ed25519Signer:
    def __init__(self, material: bytes) -> None:
        self._private = ed25519.Ed25519PrivateKey.from_private_bytes(material)

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)


def verifier(material: bytes) -> PublicKeyVerifier:
    public = ed25519.Ed25519PrivateKey.from_private_bytes(material).public_key()
    return PublicKeyVerifier(public, public.verify)


MANAGER = KeyManager(
    algorithm=Algorithm.ED25519,
    key_types=frozenset({KeyType.DATA}),
    new_material=random_material,
    builders=(Builder(SIGNER, Ed25519Signer), Builder(VERIFIER, verifier)),
)
