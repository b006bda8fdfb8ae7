"""The key backup format, version 2: one key with all its versions, sealed for transport (docs/backup.md).

A backup holds a key's metadata in the clear (so a tool can say what it is without opening it) and its
material encrypted under a fresh 256-bit content key K. Every byte before the payload is the associated
data of the payload's AES-256-GCM, so no byte of the metadata, the header or the wrapped K can change
without the backup being refused. K is carried in one of three ways (the "wrapping"):

    1  ROOT_KEY               AES-256-GCM under the deployment's root key: restore into the same deployment
                              (or one sharing its root key)
    2  RSA_OAEP_3072_SHA256   RSA-OAEP (SHA-256, MGF1-SHA-256) to an operator's 3072-bit backup public key
    3  X25519_HKDF_SHA256     an ephemeral X25519 key agreement with the operator's backup public key;
                              K = HKDF-SHA256 of the shared secret

All integers big-endian:

    offset   size  field
    0        8     magic "CAASKEYB" (ASCII)
    8        1     format version, 0x02 (0x01 is still read)
    9        1     wrapping (above)
    10       8     fingerprint of the key that opens it: the first 8 bytes of SHA-256 of the backup public
                   key's DER SubjectPublicKeyInfo, or the root key's fingerprint (domain/key_wrap.py)
    18       2     W, the length of the wrapped content key
    20       W     wrapped content key:
                     ROOT_KEY: nonce (12) || AES-256-GCM(root, K, aad = "caas.crypto.v1/key-backup-key\\0"
                               || bytes 0..17) (48)                                       W = 60
                     RSA:      RSA-OAEP(K), label "caas.crypto.v1/key-backup-key"         W = 384
                     X25519:   the ephemeral public key (32)                              W = 32
    20+W     4     M, the length of the metadata
    24+W     M     metadata (below)
    24+W+M   12    payload nonce (random)
    36+W+M   32n+16  AES-256-GCM(K, the n versions' 32-byte materials in metadata order,
                   aad = "caas.crypto.v1/key-backup\\0" || bytes 0..24+W+M-1)

For X25519, K = HKDF-SHA256(shared secret, salt none, info "caas.crypto.v1/key-backup-x25519\\0" ||
ephemeral public key || recipient public key, 32 bytes). The metadata, with str = u16 length || UTF-8,
opt = u8 0 (absent) or 1 then the value, time = i64 milliseconds since the Unix epoch (UTC):

    str tenant_id; 16 bytes key id (UUID); opt 16 bytes parent key id; str key type ("DATA", ...);
    str algorithm ("AES_256_GCM", ...); u8 disabled (0 or 1); time created_at; opt i64 expire_after (ms);
    opt i64 rotation_period (ms); u16 label count, then per label (sorted by name) str name, str value;
    u32 primary version; u32 version count n; per version (ascending): u32 version, time created_at,
    opt time expires_at, u64 encryptions, opt str request_id, u8 disabled (0 or 1); time exported_at;
    u32 min_decryption_version

Version 1 is version 2 without the per-version `disabled` and the final min_decryption_version: a version 1
backup reads as every version enabled and min_decryption_version 0 (what version 1 could not carry).

Any failure to parse is BackupMalformed; any failure to authenticate is BackupTampered, one message
whatever the cause (as for ciphertexts). Opening with a key other than the one named is BackupKeyMismatch.
"""

from __future__ import annotations

import enum
import hashlib
import os
import struct
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import TypeVar

from cryptography.exceptions import InvalidTag, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto_server.domain.algorithms import MATERIAL_BYTES, Algorithm
from crypto_server.domain.errors import (
    BackupKeyMismatch,
    BackupKeyUnsupported,
    BackupMalformed,
    BackupTampered,
)
from crypto_server.domain.key_managers import ALGORITHMS
from crypto_server.domain.key_wrap import KEY_BYTES, NONCE_BYTES, TAG_BYTES, WrappingKey
from crypto_server.domain.keys import KeyPolicy, KeyType

MAGIC = b"CAASKEYB"
FORMAT_VERSION = 2
# Format versions read: 1 lacks version states (docs/backup.md).
READABLE_FORMAT_VERSIONS = (1, 2)
FINGERPRINT_BYTES = 8
RSA_KEY_BITS = 3072
# A backup of more versions than this is refused before anything is allocated for it.
MAX_VERSIONS = 100_000
_HEADER = struct.Struct(">8sBB8sH")  # magic, version, wrapping, fingerprint, W
_PAYLOAD_DOMAIN = b"caas.crypto.v1/key-backup\x00"
_KEY_WRAP_DOMAIN = b"caas.crypto.v1/key-backup-key\x00"
_OAEP_LABEL = b"caas.crypto.v1/key-backup-key"
_X25519_INFO = b"caas.crypto.v1/key-backup-x25519\x00"
_X25519_KEY_BYTES = 32
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_E = TypeVar("_E", bound=enum.Enum)


class BackupWrapping(enum.IntEnum):
    """How a backup's content key is carried: who can open it."""

    ROOT_KEY = 1
    RSA_OAEP_3072_SHA256 = 2
    X25519_HKDF_SHA256 = 3


BackupPublicKey = rsa.RSAPublicKey | x25519.X25519PublicKey
BackupPrivateKey = rsa.RSAPrivateKey | x25519.X25519PrivateKey


@dataclass(frozen=True, slots=True)
class BackupVersion:
    version: int
    created_at: datetime
    expires_at: datetime | None
    encryptions: int
    request_id: str | None
    # DisableKeyVersion's state (format version 2; a version 1 backup reads as enabled).
    disabled: bool = False


@dataclass(frozen=True, slots=True)
class BackupMetadata:
    """Everything a backup says about its key except the material: readable without opening it."""

    tenant_id: str
    key_id: str
    parent_key_id: str | None
    key_type: KeyType
    algorithm: Algorithm
    disabled: bool
    created_at: datetime
    policy: KeyPolicy
    labels: Mapping[str, str]
    primary_version: int
    versions: tuple[BackupVersion, ...]
    exported_at: datetime
    # Versions below it refuse to decrypt (format version 2; a version 1 backup reads as 0).
    min_decryption_version: int = 0


@dataclass(frozen=True, slots=True)
class KeyBackup:
    """A key as a backup holds it, opened: its metadata and each version's material (in memory only)."""

    metadata: BackupMetadata
    # The material of metadata.versions[i], 32 bytes each.
    materials: tuple[bytes, ...] = field(repr=False)


@dataclass(frozen=True, slots=True)
class SealedBackup:
    """A backup parsed but not opened: its metadata has not been authenticated yet."""

    wrapping: BackupWrapping
    fingerprint: bytes
    wrapped_key: bytes
    metadata: BackupMetadata
    authenticated: bytes = field(repr=False)
    nonce: bytes = field(repr=False)
    payload: bytes = field(repr=False)


# -- backup keys -------------------------------------------------------------------------------------------


def backup_key_fingerprint(public_key: BackupPublicKey) -> bytes:
    """The first 8 bytes of SHA-256 of the key's DER SubjectPublicKeyInfo (`openssl pkey -pubin -outform DER
    | sha256sum`, first 16 hex digits)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()[:FINGERPRINT_BYTES]


def _check_supported(key: object, what: str) -> None:
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        if key.key_size != RSA_KEY_BITS:
            raise BackupKeyUnsupported(what, f"is an RSA key of {key.key_size} bits; backups use RSA 3072 or X25519")
        return
    if isinstance(key, x25519.X25519PublicKey | x25519.X25519PrivateKey):
        return
    raise BackupKeyUnsupported(what, f"is a {type(key).__name__.lstrip('_')}; backups use RSA 3072 or X25519")


def parse_backup_public_key(pem: bytes) -> BackupPublicKey:
    """A PEM public key (SubjectPublicKeyInfo) of RSA 3072 or X25519. Raises BackupKeyUnsupported."""
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise BackupKeyUnsupported(
            "backup_public_key", "is not a PEM public key ('-----BEGIN PUBLIC KEY-----') of RSA 3072 or X25519"
        ) from None
    _check_supported(key, "backup_public_key")
    assert isinstance(key, rsa.RSAPublicKey | x25519.X25519PublicKey)
    return key


def parse_backup_private_key(pem: bytes) -> BackupPrivateKey:
    """An unencrypted PEM private key (PKCS#8) of RSA 3072 or X25519. Raises BackupKeyUnsupported."""
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise BackupKeyUnsupported(
            "backup private key", "is not an unencrypted PEM private key ('-----BEGIN PRIVATE KEY-----')"
        ) from None
    _check_supported(key, "backup private key")
    assert isinstance(key, rsa.RSAPrivateKey | x25519.X25519PrivateKey)
    return key


# -- encoding ----------------------------------------------------------------------------------------------


def _ms(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(milliseconds=1)


def _text(value: str) -> bytes:
    encoded = value.encode()
    return struct.pack(">H", len(encoded)) + encoded


def _optional(value: bytes | None) -> bytes:
    return b"\x00" if value is None else b"\x01" + value


def _i64(value: int) -> bytes:
    return struct.pack(">q", value)


def _duration(value: timedelta | None) -> bytes:
    return _optional(None if value is None else _i64(value // timedelta(milliseconds=1)))


def encode_metadata(metadata: BackupMetadata) -> bytes:
    parts = [
        _text(metadata.tenant_id),
        uuid.UUID(metadata.key_id).bytes,
        _optional(None if metadata.parent_key_id is None else uuid.UUID(metadata.parent_key_id).bytes),
        _text(metadata.key_type.value),
        _text(metadata.algorithm.value),
        bytes([int(metadata.disabled)]),
        _i64(_ms(metadata.created_at)),
        _duration(metadata.policy.expire_after),
        _duration(metadata.policy.rotation_period),
        struct.pack(">H", len(metadata.labels)),
    ]
    for name in sorted(metadata.labels):
        parts += [_text(name), _text(metadata.labels[name])]
    parts.append(struct.pack(">II", metadata.primary_version, len(metadata.versions)))
    for version in metadata.versions:
        parts += [
            struct.pack(">I", version.version),
            _i64(_ms(version.created_at)),
            _optional(None if version.expires_at is None else _i64(_ms(version.expires_at))),
            struct.pack(">Q", version.encryptions),
            _optional(None if version.request_id is None else _text(version.request_id)),
            bytes([int(version.disabled)]),
        ]
    parts += [_i64(_ms(metadata.exported_at)), struct.pack(">I", metadata.min_decryption_version)]
    return b"".join(parts)


def _seal(backup: KeyBackup, wrapping: BackupWrapping, fingerprint: bytes, content_key: bytes, wrapped: bytes) -> bytes:
    metadata = encode_metadata(backup.metadata)
    authenticated = b"".join(
        (
            _HEADER.pack(MAGIC, FORMAT_VERSION, wrapping, fingerprint, len(wrapped)),
            wrapped,
            struct.pack(">I", len(metadata)),
            metadata,
        )
    )
    nonce = os.urandom(NONCE_BYTES)
    payload = AESGCM(content_key).encrypt(nonce, b"".join(backup.materials), _PAYLOAD_DOMAIN + authenticated)
    return authenticated + nonce + payload


def _check_backup(backup: KeyBackup) -> None:
    if len(backup.materials) != len(backup.metadata.versions) or any(
        len(material) != MATERIAL_BYTES for material in backup.materials
    ):
        raise ValueError("a backup holds one 32-byte material per version")


def seal_for_public_key(backup: KeyBackup, public_key: BackupPublicKey) -> bytes:
    """The backup, its content key wrapped for the holder of `public_key`'s private key."""
    _check_backup(backup)
    fingerprint = backup_key_fingerprint(public_key)
    if isinstance(public_key, rsa.RSAPublicKey):
        content_key = AESGCM.generate_key(bit_length=256)
        wrapped = public_key.encrypt(content_key, _oaep())
        return _seal(backup, BackupWrapping.RSA_OAEP_3072_SHA256, fingerprint, content_key, wrapped)
    ephemeral = x25519.X25519PrivateKey.generate()
    ephemeral_public = ephemeral.public_key().public_bytes_raw()
    content_key = _x25519_content_key(ephemeral.exchange(public_key), ephemeral_public, public_key.public_bytes_raw())
    return _seal(backup, BackupWrapping.X25519_HKDF_SHA256, fingerprint, content_key, ephemeral_public)


def seal_for_root_key(backup: KeyBackup, root: WrappingKey, root_fingerprint: bytes) -> bytes:
    """The backup, its content key wrapped under the deployment's root key (`root_fingerprint` names it)."""
    _check_backup(backup)
    content_key = AESGCM.generate_key(bit_length=256)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, BackupWrapping.ROOT_KEY, root_fingerprint, 0)[:-2]
    nonce = os.urandom(NONCE_BYTES)
    wrapped = nonce + root.encrypt(nonce, content_key, _KEY_WRAP_DOMAIN + header)
    return _seal(backup, BackupWrapping.ROOT_KEY, root_fingerprint, content_key, wrapped)


def _oaep() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=_OAEP_LABEL)


def _x25519_content_key(shared: bytes, ephemeral_public: bytes, recipient_public: bytes) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=_X25519_INFO + ephemeral_public + recipient_public
    ).derive(shared)


# -- decoding ----------------------------------------------------------------------------------------------


class _Reader:
    """Reads the metadata, every length checked against what is left before it is used."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._at = 0

    def take(self, size: int, what: str) -> bytes:
        if size > len(self._data) - self._at:
            raise BackupMalformed(f"it ends inside its {what}")
        chunk = self._data[self._at : self._at + size]
        self._at += size
        return chunk

    def unpack(self, layout: str, what: str) -> int:
        (value,) = struct.unpack(layout, self.take(struct.calcsize(layout), what))
        assert isinstance(value, int)
        return value

    def flag(self, what: str) -> bool:
        value = self.unpack(">B", what)
        if value > 1:
            raise BackupMalformed(f"its {what} flag is {value}, not 0 or 1")
        return value == 1

    def text(self, what: str) -> str:
        raw = self.take(self.unpack(">H", what), what)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise BackupMalformed(f"its {what} is not UTF-8") from None

    def time(self, what: str) -> datetime:
        try:
            return _EPOCH + timedelta(milliseconds=self.unpack(">q", what))
        except OverflowError:
            raise BackupMalformed(f"its {what} is out of range") from None

    def optional_duration(self, what: str) -> timedelta | None:
        if not self.flag(what):
            return None
        try:
            return timedelta(milliseconds=self.unpack(">q", what))
        except OverflowError:
            raise BackupMalformed(f"its {what} is out of range") from None

    def key_id(self, what: str) -> str:
        return str(uuid.UUID(bytes=self.take(16, what)))

    def done(self) -> None:
        if self._at != len(self._data):
            raise BackupMalformed("its metadata has bytes after its end")


def _enum(kind: type[_E], value: str, what: str) -> _E:
    try:
        return kind(value)
    except ValueError:
        raise BackupMalformed(f"its {what} {value!r} is unknown to this server") from None


def _algorithm(name: str) -> Algorithm:
    try:
        algorithm = Algorithm(name)
    except ValueError:
        algorithm = None
    if algorithm is None or ALGORITHMS.find(algorithm) is None:
        raise BackupMalformed(f"its algorithm {name!r} is unknown to this server")
    return algorithm


def decode_metadata(data: bytes, format_version: int = FORMAT_VERSION) -> BackupMetadata:
    """The metadata as `format_version` lays it out (version 1: no version states). Raises BackupMalformed."""
    states = format_version >= 2
    reader = _Reader(data)
    tenant_id = reader.text("tenant id")
    key_id = reader.key_id("key id")
    parent_key_id = reader.key_id("parent key id") if reader.flag("parent key id") else None
    key_type = _enum(KeyType, reader.text("key type"), "key type")
    algorithm = _algorithm(reader.text("algorithm"))
    disabled = reader.flag("disabled")
    created_at = reader.time("creation time")
    policy = KeyPolicy(
        expire_after=reader.optional_duration("expire_after"),
        rotation_period=reader.optional_duration("rotation_period"),
    )
    labels: dict[str, str] = {}
    for _ in range(reader.unpack(">H", "label count")):
        name = reader.text("label name")
        labels[name] = reader.text("label value")
    primary_version = reader.unpack(">I", "primary version")
    count = reader.unpack(">I", "version count")
    if not 1 <= count <= MAX_VERSIONS:
        raise BackupMalformed(f"it has {count} versions (1 to {MAX_VERSIONS} are possible)")
    versions: list[BackupVersion] = []
    for _ in range(count):
        number = reader.unpack(">I", "version number")
        if number <= (versions[-1].version if versions else 0):
            raise BackupMalformed("its version numbers are not ascending from 1")
        versions.append(
            BackupVersion(
                version=number,
                created_at=reader.time("version creation time"),
                expires_at=reader.time("version expiry") if reader.flag("version expiry") else None,
                encryptions=reader.unpack(">Q", "encryption count"),
                request_id=reader.text("request id") if reader.flag("request id") else None,
                disabled=reader.flag("version disabled") if states else False,
            )
        )
    if primary_version not in {version.version for version in versions}:
        raise BackupMalformed(f"its primary version {primary_version} is not one of its versions")
    exported_at = reader.time("export time")
    min_decryption_version = reader.unpack(">I", "min_decryption_version") if states else 0
    reader.done()
    return BackupMetadata(
        tenant_id=tenant_id,
        key_id=key_id,
        parent_key_id=parent_key_id,
        key_type=key_type,
        algorithm=algorithm,
        disabled=disabled,
        created_at=created_at,
        policy=policy,
        labels=MappingProxyType(labels),
        primary_version=primary_version,
        versions=tuple(versions),
        exported_at=exported_at,
        min_decryption_version=min_decryption_version,
    )


_WRAPPED_KEY_BYTES = {
    BackupWrapping.ROOT_KEY: NONCE_BYTES + KEY_BYTES + TAG_BYTES,
    BackupWrapping.RSA_OAEP_3072_SHA256: RSA_KEY_BITS // 8,
    BackupWrapping.X25519_HKDF_SHA256: _X25519_KEY_BYTES,
}


def read_backup(blob: bytes) -> SealedBackup:
    """Parse a backup without opening it (lengths checked before use). Raises BackupMalformed."""
    if len(blob) < _HEADER.size or blob[: len(MAGIC)] != MAGIC:
        raise BackupMalformed("it does not start as a key backup does ('CAASKEYB')")
    _, version, wrapping_code, fingerprint, wrapped_size = _HEADER.unpack_from(blob)
    if version not in READABLE_FORMAT_VERSIONS:
        raise BackupMalformed(
            f"it is of format version {version}; this server reads versions "
            f"{', '.join(map(str, READABLE_FORMAT_VERSIONS))}"
        )
    try:
        wrapping = BackupWrapping(wrapping_code)
    except ValueError:
        raise BackupMalformed(f"its wrapping {wrapping_code} is unknown to this server") from None
    if wrapped_size != _WRAPPED_KEY_BYTES[wrapping]:
        raise BackupMalformed(f"its wrapped content key is {wrapped_size} bytes, not {_WRAPPED_KEY_BYTES[wrapping]}")
    reader = _Reader(blob)
    reader.take(_HEADER.size, "header")
    wrapped_key = reader.take(wrapped_size, "wrapped content key")
    metadata_bytes = reader.take(reader.unpack(">I", "metadata length"), "metadata")
    metadata = decode_metadata(metadata_bytes, version)
    authenticated_end = _HEADER.size + wrapped_size + 4 + len(metadata_bytes)
    nonce = reader.take(NONCE_BYTES, "payload nonce")
    payload = blob[authenticated_end + NONCE_BYTES :]
    expected = MATERIAL_BYTES * len(metadata.versions) + TAG_BYTES
    if len(payload) != expected:
        raise BackupMalformed(
            f"its payload is {len(payload)} bytes; its {len(metadata.versions)} versions take {expected}"
        )
    return SealedBackup(
        wrapping=wrapping,
        fingerprint=bytes(fingerprint),
        wrapped_key=wrapped_key,
        metadata=metadata,
        authenticated=blob[:authenticated_end],
        nonce=nonce,
        payload=payload,
    )


def _open_payload(sealed: SealedBackup, content_key: bytes) -> KeyBackup:
    try:
        plaintext = AESGCM(content_key).decrypt(sealed.nonce, sealed.payload, _PAYLOAD_DOMAIN + sealed.authenticated)
    except InvalidTag:
        raise BackupTampered() from None
    materials = tuple(plaintext[i : i + MATERIAL_BYTES] for i in range(0, len(plaintext), MATERIAL_BYTES))
    return KeyBackup(metadata=sealed.metadata, materials=materials)


def open_with_private_key(sealed: SealedBackup, private_key: BackupPrivateKey | None) -> KeyBackup:
    """Open a public-key backup with the backup private key. Raises BackupKeyMismatch, BackupTampered."""
    if sealed.wrapping is BackupWrapping.ROOT_KEY:
        raise ValueError("a root key backup is opened with open_with_root_key")
    if private_key is None:
        raise BackupKeyMismatch(
            f"the backup is encrypted for backup key {sealed.fingerprint.hex()}, and this server holds no backup "
            "private key (CRYPTO_BACKUP_PRIVATE_KEY_FILE)"
        )
    public_key = private_key.public_key()
    held = backup_key_fingerprint(public_key)
    wants_rsa = sealed.wrapping is BackupWrapping.RSA_OAEP_3072_SHA256
    if held != sealed.fingerprint or wants_rsa != isinstance(private_key, rsa.RSAPrivateKey):
        raise BackupKeyMismatch(
            f"the backup is encrypted for backup key {sealed.fingerprint.hex()}; this server holds backup key "
            f"{held.hex()} (CRYPTO_BACKUP_PRIVATE_KEY_FILE)"
        )
    try:
        if isinstance(private_key, rsa.RSAPrivateKey):
            content_key = private_key.decrypt(sealed.wrapped_key, _oaep())
        else:
            assert isinstance(public_key, x25519.X25519PublicKey)
            shared = private_key.exchange(x25519.X25519PublicKey.from_public_bytes(sealed.wrapped_key))
            content_key = _x25519_content_key(shared, sealed.wrapped_key, public_key.public_bytes_raw())
    except ValueError:  # OAEP padding that does not check out; an ephemeral key of small order
        raise BackupTampered() from None
    if len(content_key) != KEY_BYTES:
        raise BackupTampered()
    return _open_payload(sealed, content_key)


def open_with_root_key(sealed: SealedBackup, roots: Sequence[tuple[bytes, WrappingKey]]) -> KeyBackup:
    """Open a root key backup with whichever of `roots` (fingerprint, key) it names. Raises BackupKeyMismatch,
    BackupTampered; RootKeyUnavailable from an HSM that cannot be used now."""
    if sealed.wrapping is not BackupWrapping.ROOT_KEY:
        raise ValueError("a public key backup is opened with open_with_private_key")
    root = next((key for fingerprint, key in roots if fingerprint == sealed.fingerprint), None)
    if root is None:
        held = ", ".join(fingerprint.hex() for fingerprint, _ in roots)
        raise BackupKeyMismatch(
            f"the backup is encrypted under root key {sealed.fingerprint.hex()}; this server's root key is {held} "
            "(restore it where that root key is configured, or export it again with a backup public key)"
        )
    nonce, wrapped = sealed.wrapped_key[:NONCE_BYTES], sealed.wrapped_key[NONCE_BYTES:]
    try:
        content_key = root.decrypt(nonce, wrapped, _KEY_WRAP_DOMAIN + sealed.authenticated[: _HEADER.size - 2])
    except InvalidTag:
        raise BackupTampered() from None
    return _open_payload(sealed, content_key)
