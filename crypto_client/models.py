"""What the client returns: plain dataclasses, never protobuf messages."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Protocol


class KeyType(enum.Enum):
    MASTER = "MASTER"
    DATA = "DATA"
    SESSION = "SESSION"


class Algorithm(enum.Enum):
    AES_256_GCM = "AES_256_GCM"
    HMAC_SHA256 = "HMAC_SHA256"
    ED25519 = "ED25519"
    ECDSA_P256_SHA256 = "ECDSA_P256_SHA256"


class KeyState(enum.Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    EXPIRED = "EXPIRED"
    # Every version scheduled for destruction (refuses every use), or destroyed. Not list filters.
    DESTROY_SCHEDULED = "DESTROY_SCHEDULED"
    DESTROYED = "DESTROYED"


class KeyVersionState(enum.Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    EXPIRED = "EXPIRED"
    DESTROY_SCHEDULED = "DESTROY_SCHEDULED"
    DESTROYED = "DESTROYED"


class HealthStatus(enum.Enum):
    SERVING = "SERVING"
    NOT_SERVING = "NOT_SERVING"
    SERVICE_UNKNOWN = "SERVICE_UNKNOWN"
    UNKNOWN = "UNKNOWN"


@dataclass(frozen=True, slots=True)
class KeyVersion:
    version: int
    state: KeyVersionState
    created_at: datetime
    expires_at: datetime | None
    # Encryptions made with this version, as flushed by every server (can trail the true figure by seconds).
    encryptions: int = 0
    # When a scheduled destruction runs (DESTROY_SCHEDULED), and when the version was destroyed (DESTROYED).
    destroy_at: datetime | None = None
    destroyed_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Key:
    """A key's metadata. Never key material."""

    key_id: str
    tenant_id: str
    key_type: KeyType
    state: KeyState
    primary_version: int
    versions: tuple[KeyVersion, ...]
    created_at: datetime
    expires_at: datetime | None
    rotation_period: timedelta | None
    labels: Mapping[str, str] = field(default_factory=dict)
    algorithm: Algorithm = Algorithm.AES_256_GCM
    # When automatic rotation gives the key a new primary; None when it is not rotated automatically.
    next_rotation_at: datetime | None = None
    # Versions below it refuse to decrypt; 0: none do.
    min_decryption_version: int = 0
    # How many versions the key has (1 to primary_version); `versions` may hold fewer:
    # list_key_versions / iter_key_versions page through them all.
    version_count: int = 0


@dataclass(frozen=True, slots=True)
class EncryptResult:
    ciphertext: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class DecryptResult:
    plaintext: bytes = field(repr=False)
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class DataKey:
    """A data key for envelope encryption: use `plaintext` locally, store `ciphertext`; Decrypt unwraps it."""

    plaintext: bytes | None = field(repr=False)
    ciphertext: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class ReEncryptResult:
    ciphertext: bytes
    key_id: str
    key_version: int
    source_key_id: str
    source_key_version: int


@dataclass(frozen=True, slots=True)
class EncryptItem:
    key_id: str
    plaintext: bytes = field(repr=False)
    aad: bytes = b""


@dataclass(frozen=True, slots=True)
class DecryptItem:
    ciphertext: bytes
    aad: bytes = b""
    key_id: str | None = None


@dataclass(frozen=True, slots=True)
class SessionKey:
    """A session key's metadata and its raw AES-256 key (for realtime media encryption)."""

    key: Key
    key_material: bytes = field(repr=False)
    key_version: int = 1


@dataclass(frozen=True, slots=True)
class MacResult:
    mac: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class SignResult:
    signature: bytes
    key_id: str
    key_version: int
    algorithm: Algorithm


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One record of the server's audit trail (never plaintext, associated data, key material or tokens)."""

    chain_id: str
    sequence: int
    time: datetime | None
    principal: str
    auth_method: str
    tenant_id: str
    rpc: str
    key_id: str
    key_version: int
    outcome: str  # the status code name the caller got, or "PENDING" before a key change
    phase: str  # "intent" or "outcome"
    request_id: str
    peer: str


@dataclass(frozen=True, slots=True)
class PublicKey:
    pem: str
    algorithm: Algorithm
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class KeyVersionPage:
    """One page of a key's versions (list_key_versions), ascending; `next_page_token` is empty on the last."""

    versions: tuple[KeyVersion, ...]
    next_page_token: str


class Progress(Protocol):
    """A progress callback for long work (FileCipher, AsyncFileCipher).

    Called with the number of plaintext bytes read from the source so far, after each chunk (at most
    `chunk_bytes` apart) and last with the total; never with a smaller number than before. It runs on the
    caller's thread (or event loop), between chunks, so it must return quickly; an exception it raises
    stops the work and propagates. `list.append` and `lambda done: ...` both fit.
    """

    def __call__(self, done_bytes: int, /) -> None: ...
