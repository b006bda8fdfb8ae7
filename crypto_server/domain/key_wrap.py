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
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac

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


def _binding(tenant_id: str, key_id: str, key_type: str, version: int, parent_version: int, algorithm: str) -> bytes:
    tenant = tenant_id.encode()
    ident = key_id.encode()
    # The algorithm is bound too: material copied onto a record claiming another algorithm must not
    # turn an encryption key into a MAC or signing key.
    kind = f"{key_type}/{algorithm}".encode()
    return b"".join(
        (
            _WRAP_DOMAIN,
            struct.pack(">H", len(tenant)),
            tenant,
            struct.pack(">H", len(ident)),
            ident,
            struct.pack(">H", len(kind)),
            kind,
            struct.pack(">II", version, parent_version),
        )
    )


def wrap_key(
    parent: WrappingKey,
    material: bytes,
    *,
    tenant_id: str,
    key_id: str,
    key_type: str,
    version: int,
    parent_version: int,
    algorithm: str,
) -> bytes:
    """Encrypt `material` under `parent`, bound to the key version it belongs to."""
    nonce = os.urandom(NONCE_BYTES)
    aad = _binding(tenant_id, key_id, key_type, version, parent_version, algorithm)
    return nonce + parent.encrypt(nonce, material, aad)


def unwrap_key(
    parent: WrappingKey,
    wrapped: bytes,
    *,
    tenant_id: str,
    key_id: str,
    key_type: str,
    version: int,
    parent_version: int,
    algorithm: str,
) -> bytes:
    """Inverse of `wrap_key`. Raises UnwrapFailed on any mismatch."""
    if len(wrapped) != WRAPPED_KEY_BYTES:
        raise UnwrapFailed("wrapped key has the wrong length")
    aad = _binding(tenant_id, key_id, key_type, version, parent_version, algorithm)
    try:
        return parent.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], aad)
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
