"""Key material and key wrapping (AES-256-GCM).

A wrapped key is `nonce (12 bytes) || ciphertext (32 bytes) || tag (16 bytes)`,
encrypted under one version of its parent key. The associated data binds the
wrapped bytes to the tenant, key id, key type, version and parent version, so a
wrapped key copied onto another record (another key, version or tenant) fails
to unwrap instead of silently becoming that key.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac

if TYPE_CHECKING:
    from crypto_server.domain.keys import Key, KeyVersion

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
WRAPPED_KEY_BYTES = NONCE_BYTES + KEY_BYTES + TAG_BYTES
_WRAP_DOMAIN = b"caas.crypto.v1/key-wrap\x00"
_ROOT_CHECK_AAD = b"caas.crypto.v1/root-key-check\x00"
_FINGERPRINT_LABEL = b"caas.crypto.v1/root-key-fingerprint"
_FINGERPRINT_BYTES = 8


class WrappingKey(Protocol):
    """An AES-256-GCM key that wraps other keys, with the caller's 96-bit nonce: cryptography's AESGCM (a master
    key, a root key from a file), or a key object that never leaves an HSM (crypto_server/pkcs11_root_key.py).

    `encrypt` returns `ciphertext || tag (16 bytes)`. `decrypt` takes the same and raises
    cryptography.exceptions.InvalidTag when it does not authenticate under this key, nonce and associated data;
    a key held elsewhere raises RootKeyUnavailable (domain/errors.py) when it cannot be used right now, which is
    not a verdict on the data.
    """

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...


class UnwrapFailed(Exception):
    """The wrapped bytes do not open under this parent key and binding."""


@dataclass(frozen=True, slots=True)
class WrappingContext:
    """What one wrapped key version is bound to: its tenant, key id, key type, version, the parent version that
    wraps it (0 under the root key) and its algorithm. The same value wraps and unwraps."""

    tenant_id: str
    key_id: str
    key_type: str
    version: int
    parent_version: int
    algorithm: str

    @classmethod
    def of(cls, key: Key, record: KeyVersion) -> WrappingContext:
        """The context of `record`, one of `key`'s stored versions."""
        return cls(
            tenant_id=key.tenant_id,
            key_id=key.key_id,
            key_type=key.key_type.value,
            version=record.version,
            parent_version=record.parent_version,
            algorithm=key.algorithm.value,
        )

    def associated_data(self) -> bytes:
        tenant = self.tenant_id.encode()
        ident = self.key_id.encode()
        # The algorithm is bound too: material copied onto a record claiming another algorithm must not
        # turn an encryption key into a MAC or signing key.
        kind = f"{self.key_type}/{self.algorithm}".encode()
        return b"".join(
            (
                _WRAP_DOMAIN,
                struct.pack(">H", len(tenant)),
                tenant,
                struct.pack(">H", len(ident)),
                ident,
                struct.pack(">H", len(kind)),
                kind,
                struct.pack(">II", self.version, self.parent_version),
            )
        )


def wrap_key(parent: WrappingKey, material: bytes, context: WrappingContext) -> bytes:
    """Encrypt `material` under `parent`, bound to the key version `context` describes."""
    if len(material) != KEY_BYTES:
        # The wrapped format holds exactly KEY_BYTES; anything else would be stored and never unwrap.
        raise ValueError(f"key material must be {KEY_BYTES} bytes")
    nonce = os.urandom(NONCE_BYTES)
    return nonce + parent.encrypt(nonce, material, context.associated_data())


def unwrap_key(parent: WrappingKey, wrapped: bytes, context: WrappingContext) -> bytes:
    """Inverse of `wrap_key`. Raises UnwrapFailed on any mismatch."""
    if len(wrapped) != WRAPPED_KEY_BYTES:
        raise UnwrapFailed("wrapped key has the wrong length")
    try:
        return parent.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], context.associated_data())
    except InvalidTag:
        raise UnwrapFailed("wrapped key does not open under its parent key") from None


def make_root_key_check(root: WrappingKey) -> bytes:
    """A value stored beside the keys that proves, at start-up, that the
    configured root key is the one that wrapped them. It reveals nothing about
    the root key (it is an AES-GCM encryption of nothing)."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + root.encrypt(nonce, b"", _ROOT_CHECK_AAD)


def root_key_matches(root: WrappingKey, check: bytes) -> bool:
    try:
        root.decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], _ROOT_CHECK_AAD)
    except (InvalidTag, ValueError):
        return False
    return True


def root_key_fingerprint(root_key: bytes) -> str:
    """A name for a root key that is safe to log and print: the first 8 bytes of
    HMAC-SHA256(root_key, "caas.crypto.v1/root-key-fingerprint"), in hex. It tells
    keys apart (a replica's log line against what an operator is about to use)
    and reveals nothing about the key."""
    mac = hmac.HMAC(root_key, hashes.SHA256())
    mac.update(_FINGERPRINT_LABEL)
    return mac.finalize()[:_FINGERPRINT_BYTES].hex()
