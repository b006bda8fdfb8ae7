"""The self-describing ciphertext format, version 1 (docs/ciphertext-format.md).

    offset  size  field
    0       1     format version, 0x01
    1       16    key id (the UUID's 16 bytes)
    17      4     key version, unsigned big-endian
    21      12    nonce (random)
    33      n     AEAD ciphertext of the n-byte plaintext
    33+n    16    AEAD tag

The AEAD is the key's algorithm (AES-256-GCM unless the key names another whose key manager
builds an AEAD with 96-bit nonces and 16-byte tags); the header names the key, so nothing here
names the algorithm.

The associated data given to the AEAD is

    "caas.crypto.v1/encrypt\\0" || u16 len(tenant_id) || tenant_id || bytes 0..20 (the header) || caller aad

so the tenant, key id, key version and format are authenticated with the
caller's aad: a ciphertext replayed under another tenant, key or version, or
with other aad, fails the tag check.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag

from crypto_server.domain.algorithms import Aead
from crypto_server.domain.errors import DecryptionFailed
from crypto_server.domain.key_wrap import NONCE_BYTES, TAG_BYTES
from crypto_server.domain.nonces import random_nonce

FORMAT_VERSION = 1
_FORMAT_BYTE = bytes([FORMAT_VERSION])
_VERSION = struct.Struct(">I")
HEADER_BYTES = 1 + 16 + 4
OVERHEAD_BYTES = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
MAX_KEY_VERSION = 2**32 - 1
_AAD_DOMAIN = b"caas.crypto.v1/encrypt\x00"


@dataclass(frozen=True, slots=True)
class CiphertextHeader:
    key_id: uuid.UUID
    key_version: int


def _tenant_part(tenant_id: str) -> bytes:
    tenant = tenant_id.encode()
    return _AAD_DOMAIN + len(tenant).to_bytes(2, "big") + tenant


class Sealer:
    """`encrypt` for many plaintexts with one key version of one tenant (a batch): the header and the fixed
    part of the associated data are made once."""

    __slots__ = ("_aead", "_fixed", "_header")

    def __init__(self, aead: Aead, tenant_id: str, key_id: uuid.UUID, key_version: int) -> None:
        self._aead = aead
        self._header = _FORMAT_BYTE + key_id.bytes + _VERSION.pack(key_version)
        self._fixed = _tenant_part(tenant_id) + self._header

    def seal(self, plaintext: bytes, aad: bytes) -> bytes:
        nonce = random_nonce()
        return self._header + nonce + self._aead.encrypt(nonce, plaintext, self._fixed + aad)


class Opener:
    """`decrypt` for many ciphertexts of one tenant under one key version (a batch), whose headers were
    read with `read_header`: the tenant's part of the associated data is made once."""

    __slots__ = ("_aead", "_tenant")

    def __init__(self, aead: Aead, tenant_id: str) -> None:
        self._aead = aead
        self._tenant = _tenant_part(tenant_id)

    def open(self, ciphertext: bytes, aad: bytes) -> bytes:
        """Raises DecryptionFailed."""
        try:
            return self._aead.decrypt(
                ciphertext[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES],
                ciphertext[HEADER_BYTES + NONCE_BYTES :],
                self._tenant + ciphertext[:HEADER_BYTES] + aad,
            )
        except InvalidTag:
            raise DecryptionFailed() from None


def encrypt(aead: Aead, tenant_id: str, key_id: uuid.UUID, key_version: int, plaintext: bytes, aad: bytes) -> bytes:
    """Encrypt `plaintext` with a fresh 96-bit random nonce into the v1 format."""
    return Sealer(aead, tenant_id, key_id, key_version).seal(plaintext, aad)


def read_header(ciphertext: bytes) -> CiphertextHeader:
    """Parse the header after checking the length. Raises DecryptionFailed."""
    if len(ciphertext) < OVERHEAD_BYTES or ciphertext[0] != FORMAT_VERSION:
        raise DecryptionFailed()
    (key_version,) = _VERSION.unpack_from(ciphertext, 17)
    return CiphertextHeader(key_id=uuid.UUID(bytes=bytes(ciphertext[1:17])), key_version=key_version)


def decrypt(aead: Aead, tenant_id: str, ciphertext: bytes, aad: bytes) -> bytes:
    """Open a ciphertext whose header was read with `read_header`. Raises DecryptionFailed."""
    return Opener(aead, tenant_id).open(ciphertext, aad)
