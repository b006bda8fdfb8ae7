"""What every signature algorithm's verifier does the same way: a `cryptography` public key that answers
`verify` with a bool and exports itself as PEM SubjectPublicKeyInfo."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization


class _PublicKey(Protocol):
    def public_bytes(self, encoding: serialization.Encoding, format: serialization.PublicFormat) -> bytes: ...


@dataclass(frozen=True, slots=True)
class PublicKeyVerifier:
    public_key: _PublicKey
    # The algorithm's check, `(signature, message)`: raises InvalidSignature when the signature is not valid.
    check: Callable[[bytes, bytes], None]

    def verify(self, message: bytes, signature: bytes) -> bool:
        try:
            self.check(signature, message)
        except InvalidSignature:
            return False
        return True

    def public_key_pem(self) -> str:
        return self.public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
