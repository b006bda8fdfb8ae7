"""Authenticated key metadata: a MAC over everything that decides how a key may be used.

Wrapped material is authenticated by its own AES-GCM binding (key_wrap.py), but
the metadata around it — disabled or not, which version is primary, which
versions exist and when they expire, each version's state (disabled, scheduled
for destruction and when, destroyed), min_decryption_version, the policy,
labels, tenant and parent — is plain data in the store. Without a MAC, anyone
able to write to the database could re-enable a disabled key, cancel a
destruction or roll a rotation back by editing one field.

Every key therefore carries an `integrity_tag`: HMAC-SHA256, under the store's
metadata key, of a canonical encoding of that metadata. The metadata key is 32
random bytes kept in the store only wrapped under the root key (like a master
key), so whoever lacks the root key cannot compute a tag, and a root key
rotation re-wraps one value instead of re-tagging every key.

What it does not cover, by design: the wrapped material (its AEAD binding
already refuses any swap), and the store's own bookkeeping (`revision`, used
for compare-and-set). A whole earlier row, tag included, written back by
someone with write access to the store is a consistent older state that a
per-key MAC cannot tell from the current one (docs/security.md).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidTag

from crypto_server.domain.key_wrap import KEY_BYTES, NONCE_BYTES, WrappingKey
from crypto_server.domain.keys import Key

_TAG_DOMAIN = b"caas.crypto.v1/key-metadata\x00"
_METADATA_KEY_AAD = b"caas.crypto.v1/metadata-key\x00"
_REQUEST_KEY_ID_LABEL = b"caas.crypto.v1/request-key-ids\x00"
_AUDIT_CHAIN_LABEL = b"caas.crypto.v1/audit-chain\x00"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The name the wrapped metadata key is kept under in the store's metadata table.
METADATA_KEY_RECORD = "metadata_key"


def _ms(moment: datetime | None) -> int | None:
    return None if moment is None else (moment - _EPOCH) // timedelta(milliseconds=1)


def _duration_ms(duration: timedelta | None) -> int | None:
    return None if duration is None else duration // timedelta(milliseconds=1)


def canonical_metadata(key: Key) -> bytes:
    """The bytes the tag is computed over: sorted-key JSON, times in milliseconds since the epoch."""
    document: dict[str, Any] = {
        "tenant_id": key.tenant_id,
        "key_id": key.key_id,
        "key_type": key.key_type.value,
        "algorithm": key.algorithm.value,
        "disabled": key.disabled,
        "primary_version": key.primary_version,
        "created_at": _ms(key.created_at),
        "expire_after_ms": _duration_ms(key.policy.expire_after),
        "rotation_period_ms": _duration_ms(key.policy.rotation_period),
        "labels": dict(key.labels),
        "parent_key_id": key.parent_key_id,
        "versions": [
            {
                "version": v.version,
                "created_at": _ms(v.created_at),
                "expires_at": _ms(v.expires_at),
                "parent_version": v.parent_version,
                "request_id": v.request_id,
            }
            for v in key.versions
        ],
    }
    _add_destruction_fields(document, key)
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _add_destruction_fields(document: dict[str, Any], key: Key) -> None:
    """Version states (domain/key_destruction.py), each only when it differs from the default: a key written
    before they existed keeps its tag, and any non-default value (or its removal) changes the bytes."""
    if key.min_decryption_version:
        document["min_decryption_version"] = key.min_decryption_version
    for entry, version in zip(document["versions"], key.versions, strict=True):
        if version.disabled:
            entry["disabled"] = True
        if version.destroy_at is not None:
            entry["destroy_at"] = _ms(version.destroy_at)
        if version.destroyed_at is not None:
            entry["destroyed_at"] = _ms(version.destroyed_at)


class MetadataAuthenticator:
    """Computes and checks keys' integrity tags under one metadata key."""

    def __init__(self, metadata_key: bytes) -> None:
        if len(metadata_key) != KEY_BYTES:
            raise ValueError(f"the metadata key is {KEY_BYTES} bytes")
        self._key = metadata_key

    def tag(self, key: Key) -> bytes:
        return hmac.new(self._key, _TAG_DOMAIN + canonical_metadata(key), hashlib.sha256).digest()

    def verify(self, key: Key) -> bool:
        """Whether `key.integrity_tag` is the tag of its metadata (constant-time comparison)."""
        return hmac.compare_digest(self.tag(key), key.integrity_tag)

    def request_key_id_secret(self) -> bytes:
        """A secret for deriving the key ids of idempotent creations, so that knowing a request id
        is not enough to compute the id of the key it created."""
        return hmac.new(self._key, _REQUEST_KEY_ID_LABEL, hashlib.sha256).digest()

    def audit_chain_key(self) -> bytes:
        """The key of the audit trail's hash chain (domain/audit_chain.py): derived under its own label, so
        that neither it nor the metadata key can be computed from the other's uses."""
        return hmac.new(self._key, _AUDIT_CHAIN_LABEL, hashlib.sha256).digest()


def new_metadata_key() -> bytes:
    return os.urandom(KEY_BYTES)


def wrap_metadata_key(root: WrappingKey, metadata_key: bytes) -> bytes:
    """`nonce (12) || AES-256-GCM(root, metadata key, aad "caas.crypto.v1/metadata-key\\0")`."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + root.encrypt(nonce, metadata_key, _METADATA_KEY_AAD)


def unwrap_metadata_key(roots: tuple[WrappingKey, ...], wrapped: bytes) -> bytes | None:
    """The metadata key, under the first of `roots` that opens it; None when none does."""
    for root in roots:
        try:
            return root.decrypt(wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _METADATA_KEY_AAD)
        except (InvalidTag, ValueError):
            continue
    return None
