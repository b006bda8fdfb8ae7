"""Encrypt and Decrypt with a tenant's keys.

The hot path: with the key already in the keyring, an operation is a dict
lookup, an expiry comparison and one AES-GCM call — no store, no unwrapping.
"""

from __future__ import annotations

from dataclasses import dataclass

from crypto_server.domain import ciphertext as codec
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import (
    DecryptionFailed,
    InvalidArgument,
    KeyDisabled,
    KeyExpired,
    KeyNotFound,
    KeyTypeMismatch,
)
from crypto_server.domain.keys import KeyType, KeyVersionState, parse_key_id, validate_tenant_id
from crypto_server.service.keyring import Keyring, LoadedKey

DEFAULT_MAX_PLAINTEXT_BYTES = 1024 * 1024
MAX_AAD_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class Encrypted:
    ciphertext: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class Decrypted:
    plaintext: bytes
    key_id: str
    key_version: int


class CryptoOperations:
    def __init__(self, keyring: Keyring, clock: Clock, *, max_plaintext_bytes: int = DEFAULT_MAX_PLAINTEXT_BYTES):
        if max_plaintext_bytes < 1:
            raise ValueError("max_plaintext_bytes must be positive")
        self._keyring = keyring
        self._clock = clock
        self.max_plaintext_bytes = max_plaintext_bytes

    def _key(self, tenant_id: str, key_id: str) -> LoadedKey:
        # Only valid ids are ever in the keyring, so a hit needs no validation.
        loaded = self._keyring.fresh(tenant_id, key_id)
        if loaded is None:
            validate_tenant_id(tenant_id)
            parse_key_id(key_id)
            loaded = self._keyring.get(tenant_id, key_id)
        return loaded

    def encrypt(self, tenant_id: str, key_id: str, plaintext: bytes, aad: bytes = b"") -> Encrypted:
        if len(plaintext) > self.max_plaintext_bytes:
            raise InvalidArgument(
                "plaintext",
                f"is {len(plaintext)} bytes, over the limit of {self.max_plaintext_bytes}; "
                "split the data or use envelope encryption",
            )
        _check_aad(aad)
        loaded = self._key(tenant_id, key_id)
        key = loaded.key
        if key.key_type is KeyType.MASTER:
            raise KeyTypeMismatch(
                key_id, f"key {key_id} is the tenant's master key, which only wraps other keys; encrypt with a data key"
            )
        if key.disabled:
            raise KeyDisabled(key_id)
        primary = key.primary
        if primary.state_at(self._clock.now()) is KeyVersionState.EXPIRED:
            raise KeyExpired(key_id, primary.version)
        aead = self._keyring.aead(loaded, primary.version)
        sealed = codec.encrypt(aead, tenant_id, loaded.key_uuid, primary.version, plaintext, aad)
        return Encrypted(ciphertext=sealed, key_id=key_id, key_version=primary.version)

    def decrypt(self, tenant_id: str, ciphertext: bytes, aad: bytes = b"", key_id: str = "") -> Decrypted:
        """Open a ciphertext made by `encrypt`.

        Every problem with the ciphertext itself, including naming a key this
        tenant does not have, is the one DecryptionFailed: a caller cannot tell
        another tenant's ciphertext from garbage. An explicit `key_id` that
        does not exist is NOT_FOUND, as everywhere else.
        """
        validate_tenant_id(tenant_id)
        _check_aad(aad)
        named = self._key(tenant_id, key_id) if key_id else None
        if len(ciphertext) > self.max_plaintext_bytes + codec.OVERHEAD_BYTES:
            raise DecryptionFailed()
        header = codec.read_header(ciphertext)
        if named is not None and header.key_id != named.key_uuid:
            raise DecryptionFailed()
        try:
            loaded = named or self._key(tenant_id, str(header.key_id))
        except KeyNotFound:
            raise DecryptionFailed() from None
        key = loaded.key
        if key.key_type is KeyType.MASTER or key.version(header.key_version) is None:
            raise DecryptionFailed()
        if key.disabled:
            raise KeyDisabled(key.key_id)
        aead = self._keyring.aead(loaded, header.key_version)
        plaintext = codec.decrypt(aead, tenant_id, ciphertext, aad)
        return Decrypted(plaintext=plaintext, key_id=key.key_id, key_version=header.key_version)


def _check_aad(aad: bytes) -> None:
    if len(aad) > MAX_AAD_BYTES:
        raise InvalidArgument("aad", f"is {len(aad)} bytes, over the limit of {MAX_AAD_BYTES}")
