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

The tag is split so that its cost does not grow with a key's age (issue 17):
the key's tag covers the key's own metadata, which version is primary, and the
state of every version that has one (disabled, scheduled for destruction,
destroyed; a key always holds those versions, see domain/keys.py); each version
carries its own tag over its immutable metadata (number, times, parent version,
request id) bound to its tenant and key. A version read on its own is checked
by its tag, and having no state of its own is vouched for by its key's tag,
which lists every version that has one. Keys tagged before the split (one tag
over every version) are still accepted, checked whole, and re-tagged
(storage/integrity.py).

What it does not cover, by design: the wrapped material (its AEAD binding
already refuses any swap), the encryption counts (service/usage_budget.py), and
the store's own bookkeeping (`revision`, used for compare-and-set). A whole
earlier row, tag included, written back by someone with write access to the
store is a consistent older state that a per-key MAC cannot tell from the
current one (docs/security.md); with per-version tags this holds per version row
too, and no more than that: a version's state lives in its key's tag.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.exceptions import InvalidTag

from crypto_server.domain.key_wrap import KEY_BYTES, NONCE_BYTES, WrappingKey
from crypto_server.domain.keys import Key, KeyVersion

_TAG_DOMAIN = b"caas.crypto.v1/key-metadata\x00"  # the tag over every version, before the split
_KEY_TAG_DOMAIN = b"caas.crypto.v2/key-metadata\x00"
_VERSION_TAG_DOMAIN = b"caas.crypto.v2/key-version\x00"
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


def _canonical(document: dict[str, Any]) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _key_fields(key: Key) -> dict[str, Any]:
    return {
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
    }


def _version_fields(version: KeyVersion) -> dict[str, Any]:
    return {
        "version": version.version,
        "created_at": _ms(version.created_at),
        "expires_at": _ms(version.expires_at),
        "parent_version": version.parent_version,
        "request_id": version.request_id,
    }


def _state_fields(version: KeyVersion) -> dict[str, Any]:
    """A version's states, each only when it differs from the default."""
    state: dict[str, Any] = {}
    if version.disabled:
        state["disabled"] = True
    if version.destroy_at is not None:
        state["destroy_at"] = _ms(version.destroy_at)
    if version.destroyed_at is not None:
        state["destroyed_at"] = _ms(version.destroyed_at)
    return state


def canonical_key_metadata(key: Key) -> bytes:
    """What a key's tag covers: its metadata and the states of the versions that have one (keyed by number)."""
    document = _key_fields(key)
    document["min_decryption_version"] = key.min_decryption_version
    document["version_states"] = {str(v.version): _state_fields(v) for v in key.versions if v.has_state}
    return _canonical(document)


def canonical_version_metadata(tenant_id: str, key_id: str, version: KeyVersion) -> bytes:
    """What a version's tag covers: its immutable metadata, bound to its tenant and key."""
    return _canonical({"tenant_id": tenant_id, "key_id": key_id, **_version_fields(version)})


def canonical_metadata(key: Key) -> bytes:
    """The bytes of a tag from before the split, over the whole key with every version: sorted-key JSON, times in
    milliseconds since the epoch. Only checked (a key written before), never written."""
    document = _key_fields(key)
    document["versions"] = [_version_fields(v) for v in key.versions]
    if key.min_decryption_version:
        document["min_decryption_version"] = key.min_decryption_version
    for entry, version in zip(document["versions"], key.versions, strict=True):
        entry.update(_state_fields(version))
    return _canonical(document)


class MetadataAuthenticator:
    """Computes and checks keys' integrity tags under one metadata key."""

    def __init__(self, metadata_key: bytes) -> None:
        if len(metadata_key) != KEY_BYTES:
            raise ValueError(f"the metadata key is {KEY_BYTES} bytes")
        self._key = metadata_key

    def _mac(self, domain: bytes, data: bytes) -> bytes:
        return hmac.new(self._key, domain + data, hashlib.sha256).digest()

    def tag(self, key: Key) -> bytes:
        """The key's own tag (its metadata and its versions' states)."""
        return self._mac(_KEY_TAG_DOMAIN, canonical_key_metadata(key))

    def version_tag(self, tenant_id: str, key_id: str, version: KeyVersion) -> bytes:
        return self._mac(_VERSION_TAG_DOMAIN, canonical_version_metadata(tenant_id, key_id, version))

    def tagged(self, key: Key) -> Key:
        """`key` with its tag and a tag on every version it holds (tags are deterministic: an unchanged version
        gets the tag it had)."""
        versions = tuple(replace(v, integrity_tag=self.version_tag(key.tenant_id, key.key_id, v)) for v in key.versions)
        tagged = replace(key, versions=versions)
        return replace(tagged, integrity_tag=self.tag(tagged))

    def verify(self, key: Key) -> bool:
        """Whether `key.integrity_tag` is the tag of its metadata and each version it holds carries its own
        (constant-time comparisons)."""
        return hmac.compare_digest(self.tag(key), key.integrity_tag) and all(
            self.verify_version(key.tenant_id, key.key_id, v) for v in key.versions
        )

    def verify_version(self, tenant_id: str, key_id: str, version: KeyVersion) -> bool:
        return hmac.compare_digest(self.version_tag(tenant_id, key_id, version), version.integrity_tag)

    def verify_before_split(self, key: Key) -> bool:
        """Whether `key`, holding every version, carries a valid tag from before the split."""
        tag = self._mac(_TAG_DOMAIN, canonical_metadata(key))
        return key.holds_every_version and hmac.compare_digest(tag, key.integrity_tag)

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
