"""Offline key recovery, written from docs/ciphertext-format.md alone.

This is what an operator's recovery tool would be: it reads the root key file and the embedded store's SQLite
rows and unwraps keys and version-1 ciphertexts using only `cryptography`'s AESGCM, `struct` and the page. It
imports nothing from `crypto_server` on purpose, so the tests that use it check the page against the code.
"""

from __future__ import annotations

import base64
import sqlite3
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

NONCE_BYTES = 12
MATERIAL_BYTES = 32
WRAPPED_BYTES = NONCE_BYTES + MATERIAL_BYTES + 16
KEY_WRAP_DOMAIN = b"caas.crypto.v1/key-wrap\x00"
ROOT_KEY_CHECK_DOMAIN = b"caas.crypto.v1/root-key-check\x00"
ENCRYPT_DOMAIN = b"caas.crypto.v1/encrypt\x00"
CIPHERTEXT_HEADER_BYTES = 21
ROOT_PARENT_VERSION = 0


def _prefixed(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack(">H", len(data)) + data


@dataclass(frozen=True)
class Binding:
    """The fields a wrapped key version is bound to ("Associated data" in the page)."""

    tenant_id: str
    key_id: str
    key_type: str
    algorithm: str
    version: int
    parent_version: int

    def associated_data(self) -> bytes:
        return b"".join(
            (
                KEY_WRAP_DOMAIN,
                _prefixed(self.tenant_id),
                _prefixed(self.key_id),
                _prefixed(f"{self.key_type}/{self.algorithm}"),
                struct.pack(">I", self.version),
                struct.pack(">I", self.parent_version),
            )
        )


def wrap(parent_key: bytes, material: bytes, binding: Binding, nonce: bytes) -> bytes:
    """`nonce || ciphertext || tag` with a chosen nonce: only for making known-answer vectors."""
    return nonce + AESGCM(parent_key).encrypt(nonce, material, binding.associated_data())


def unwrap(parent_key: bytes, wrapped: bytes, binding: Binding) -> bytes:
    """The 32-byte material of one key version. Raises InvalidTag if any binding field or the parent is wrong."""
    if len(wrapped) != WRAPPED_BYTES:
        raise InvalidTag
    return AESGCM(parent_key).decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], binding.associated_data())


def make_root_key_check(root_key: bytes, nonce: bytes) -> bytes:
    """`nonce || tag` of the encryption of nothing under the root key, with a chosen nonce (for vectors)."""
    return nonce + AESGCM(root_key).encrypt(nonce, b"", ROOT_KEY_CHECK_DOMAIN)


def root_key_check_opens(root_key: bytes, check: bytes) -> bool:
    """Whether `check` (`nonce || tag`, the encryption of nothing) was made under `root_key`."""
    try:
        AESGCM(root_key).decrypt(check[:NONCE_BYTES], check[NONCE_BYTES:], ROOT_KEY_CHECK_DOMAIN)
    except InvalidTag:
        return False
    return True


def read_root_key_file(path: Path) -> bytes:
    """The root key file holds the 32-byte key as base64 text; surrounding whitespace is ignored."""
    root_key = base64.b64decode(path.read_text().strip(), validate=True)
    assert len(root_key) == MATERIAL_BYTES
    return root_key


def hmac_sha256(material: bytes, message: bytes) -> bytes:
    """An HMAC_SHA256 key's material is the HMAC key itself."""
    mac = hmac.HMAC(material, hashes.SHA256())
    mac.update(message)
    return mac.finalize()


def signing_key(algorithm: str, material: bytes) -> ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey:
    """An ED25519 key's material is its RFC 8032 private key (the seed); an ECDSA_P256_SHA256 key's is its
    private scalar, unsigned big-endian."""
    if algorithm == "ED25519":
        return ed25519.Ed25519PrivateKey.from_private_bytes(material)
    assert algorithm == "ECDSA_P256_SHA256"
    return ec.derive_private_key(int.from_bytes(material, "big"), ec.SECP256R1())


@dataclass(frozen=True)
class CiphertextHeader:
    key_id: str
    key_version: int


def read_ciphertext_header(ciphertext: bytes) -> CiphertextHeader:
    assert ciphertext[0] == 1, "not a version-1 ciphertext"
    (key_version,) = struct.unpack(">I", ciphertext[17:21])
    return CiphertextHeader(str(uuid.UUID(bytes=ciphertext[1:17])), key_version)


def decrypt_v1(data_key: bytes, tenant_id: str, ciphertext: bytes, aad: bytes) -> bytes:
    associated_data = ENCRYPT_DOMAIN + _prefixed(tenant_id) + ciphertext[:CIPHERTEXT_HEADER_BYTES] + aad
    nonce = ciphertext[CIPHERTEXT_HEADER_BYTES : CIPHERTEXT_HEADER_BYTES + NONCE_BYTES]
    return AESGCM(data_key).decrypt(nonce, ciphertext[CIPHERTEXT_HEADER_BYTES + NONCE_BYTES :], associated_data)


@dataclass(frozen=True)
class KeyRow:
    key_id: str
    tenant_id: str
    key_type: str
    algorithm: str
    parent_key_id: str | None


@dataclass(frozen=True)
class VersionRow:
    parent_version: int
    wrapped_material: bytes


class StoreFile:
    """The rows of the embedded store (`keys.sqlite3`, or a `.backup` copy of it) that recovery reads."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)

    def close(self) -> None:
        self._db.close()

    def key(self, key_id: str) -> KeyRow:
        row = self._db.execute(
            "SELECT key_id, tenant_id, key_type, algorithm, parent_key_id FROM keys WHERE key_id = ?", (key_id,)
        ).fetchone()
        assert row is not None, f"no key {key_id}"
        return KeyRow(*row)

    def version(self, key_id: str, version: int) -> VersionRow:
        row = self._db.execute(
            "SELECT parent_version, wrapped_material FROM key_versions WHERE key_id = ? AND version = ?",
            (key_id, version),
        ).fetchone()
        assert row is not None, f"no version {version} of key {key_id}"
        return VersionRow(row[0], bytes(row[1]))

    def root_key_check(self) -> bytes:
        (value,) = self._db.execute("SELECT value FROM store_meta WHERE name = 'root_key_check'").fetchone()
        return bytes(value)


def recover_material(store: StoreFile, root_key: bytes, key_id: str, version: int) -> bytes:
    """One key version's material: a master key's opens under the root key, any other key's under the
    version of its master key that its row names."""
    key = store.key(key_id)
    record = store.version(key_id, version)
    if key.parent_key_id is None:
        parent = root_key
    else:
        parent = recover_material(store, root_key, key.parent_key_id, record.parent_version)
    binding = Binding(key.tenant_id, key.key_id, key.key_type, key.algorithm, version, record.parent_version)
    return unwrap(parent, record.wrapped_material, binding)
