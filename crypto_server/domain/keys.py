"""Keys and their versions.

A key is a named, versioned secret of one tenant. Each version holds its own
32-byte material, stored only wrapped (encrypted) under the version of the
parent key recorded with it: the root key for a tenant's master key, the
tenant's master key for its data and session keys.

A version stops encrypting at its `expires_at` but keeps decrypting, so no
data becomes unreadable by surprise. The key's effective state is derived from
its disabled flag and its primary version's expiry.

A key with a rotation period is rotated automatically (service/key_rotator.py)
at `next_rotation_at`: when its primary is that old, or shortly before the
primary expires if that comes first, so such a key keeps encrypting with a
fresh primary. A key without one stops encrypting when its primary expires.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from types import MappingProxyType

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.errors import InvalidArgument

TENANT_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
LABEL_KEY_PATTERN = re.compile(r"[a-z][a-z0-9_.\-]{0,62}")
MAX_LABELS = 64
MAX_LABEL_VALUE_CHARS = 256

DEFAULT_DATA_KEY_LIFETIME = timedelta(days=365)
DEFAULT_SESSION_KEY_LIFETIME = timedelta(hours=24)
MAX_SESSION_KEY_LIFETIME = timedelta(days=7)
DEFAULT_ROTATION_PERIOD = timedelta(days=90)
MIN_LIFETIME = timedelta(minutes=1)
MAX_LIFETIME = timedelta(days=100 * 365)
MIN_ROTATION_PERIOD = timedelta(hours=1)
MAX_ROTATION_PERIOD = timedelta(days=100 * 365)
# A primary due to expire is replaced this long before it does (or in the last tenth of its lifetime, if
# shorter): the rotator runs on an interval, and the key must not spend that interval unable to encrypt.
EXPIRY_ROTATION_LEAD = timedelta(days=1)


def to_key_precision(moment: datetime) -> datetime:
    """Key timestamps have millisecond precision, the precision every store keeps (BSON dates included)."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class KeyType(enum.Enum):
    MASTER = "MASTER"
    DATA = "DATA"
    SESSION = "SESSION"


class KeyState(enum.Enum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    EXPIRED = "EXPIRED"
    # The primary version is scheduled for destruction, or destroyed (domain/key_destruction.py).
    DESTROY_SCHEDULED = "DESTROY_SCHEDULED"
    DESTROYED = "DESTROYED"


class KeyVersionState(enum.Enum):
    ENABLED = "ENABLED"
    EXPIRED = "EXPIRED"
    DISABLED = "DISABLED"
    DESTROY_SCHEDULED = "DESTROY_SCHEDULED"
    DESTROYED = "DESTROYED"


@dataclass(frozen=True, slots=True)
class StateCondition:
    """When a key is in `state`, in terms of two stored fields: its disabled flag, and whether its primary
    version has expired (`primary_expires_at` set and <= now). None: either value."""

    state: KeyState
    disabled: bool | None
    primary_expired: bool | None

    def holds(self, disabled: bool, primary_expired: bool) -> bool:
        return (self.disabled is None or self.disabled is disabled) and (
            self.primary_expired is None or self.primary_expired is primary_expired
        )


# The one definition of a key's effective state: disabled wins; else an expired primary makes it EXPIRED.
# The conditions exclude each other, so a store can select the keys of one state with one condition: each store
# translates them into its query language in one helper (storage/sqlite.py `_state_sql`, storage/mongo.py
# `_state_filter`), and tests/storage/test_contract.py checks every store's answer against Key.state_at.
KEY_STATE_RULE: tuple[StateCondition, ...] = (
    StateCondition(KeyState.DISABLED, disabled=True, primary_expired=None),
    StateCondition(KeyState.EXPIRED, disabled=False, primary_expired=True),
    StateCondition(KeyState.ENABLED, disabled=False, primary_expired=False),
)


def state_condition(state: KeyState) -> StateCondition:
    return next(condition for condition in KEY_STATE_RULE if condition.state is state)


def validate_tenant_id(tenant_id: str) -> str:
    """Return `tenant_id` if it is 1-64 characters of [A-Za-z0-9_.-] starting with a letter or digit."""
    if not tenant_id:
        raise InvalidArgument("tenant_id", "is required")
    if TENANT_ID_PATTERN.fullmatch(tenant_id) is None:
        raise InvalidArgument(
            "tenant_id", "must be 1-64 characters of letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return tenant_id


def parse_key_id(key_id: str, field_name: str = "key_id") -> uuid.UUID:
    """Parse a key id in the canonical UUID text form the service hands out."""
    if not key_id:
        raise InvalidArgument(field_name, "is required")
    try:
        parsed = uuid.UUID(key_id)
    except ValueError:
        parsed = None
    if parsed is None or str(parsed) != key_id:
        raise InvalidArgument(field_name, "must be a key id as returned by CreateKey (a lowercase UUID)")
    return parsed


def validate_request_id(request_id: str) -> str:
    """An idempotency key: empty (none) or 1-128 characters of [A-Za-z0-9._:-]."""
    if request_id and REQUEST_ID_PATTERN.fullmatch(request_id) is None:
        raise InvalidArgument("request_id", "must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return request_id


def key_id_for_request(tenant_id: str, request_id: str, secret: bytes) -> str:
    """The key id an idempotent CreateKey gets: the same for every repeat of the request, so the
    store's uniqueness of key ids is what makes a repeat create nothing. Keyed with a server secret:
    whoever knows only a request id cannot compute the id of the key it created."""
    digest = hmac.new(secret, f"{tenant_id}\0{request_id}".encode(), hashlib.sha256).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


def validate_labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument("labels", f"at most {MAX_LABELS} labels are allowed")
    for name, value in labels.items():
        if LABEL_KEY_PATTERN.fullmatch(name) is None:
            raise InvalidArgument(
                "labels", "label names must be 1-63 characters of a-z, 0-9, '_', '.' or '-', starting with a letter"
            )
        if len(value) > MAX_LABEL_VALUE_CHARS:
            raise InvalidArgument("labels", f"label values must be at most {MAX_LABEL_VALUE_CHARS} characters")
    return MappingProxyType(dict(labels))


def _check_duration(field_name: str, value: timedelta, low: timedelta, high: timedelta) -> None:
    if not low <= value <= high:
        # In seconds, as protobuf's JSON form of a Duration writes them ("3600s").
        raise InvalidArgument(field_name, f"must be between {low.total_seconds():.0f}s and {high.total_seconds():.0f}s")


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """The lifetime settings chosen when a key is created."""

    expire_after: timedelta | None
    rotation_period: timedelta | None

    @classmethod
    def for_new_key(
        cls,
        key_type: KeyType,
        expire_after: timedelta | None,
        rotation_period: timedelta | None,
        *,
        implicit_master: bool = False,
        max_session_lifetime: timedelta = MAX_SESSION_KEY_LIFETIME,
    ) -> KeyPolicy:
        """Apply the defaults for `key_type` and validate the caller's choices.

        A master key created on a tenant's first use never expires: its expiry
        would stop the tenant from creating keys with no one having asked for it.
        """
        if expire_after is not None:
            high = max_session_lifetime if key_type is KeyType.SESSION else MAX_LIFETIME
            _check_duration("expire_after", expire_after, MIN_LIFETIME, high)
        elif key_type is KeyType.SESSION:
            expire_after = min(DEFAULT_SESSION_KEY_LIFETIME, max_session_lifetime)
        elif key_type is KeyType.DATA or not implicit_master:
            expire_after = DEFAULT_DATA_KEY_LIFETIME
        if rotation_period is not None:
            _check_duration("rotation_period", rotation_period, MIN_ROTATION_PERIOD, MAX_ROTATION_PERIOD)
        else:
            rotation_period = DEFAULT_ROTATION_PERIOD
        return cls(expire_after=expire_after, rotation_period=rotation_period)

    def updated(
        self,
        key_type: KeyType,
        *,
        expire_after: timedelta | None,
        rotation_period: timedelta | None,
        max_session_lifetime: timedelta = MAX_SESSION_KEY_LIFETIME,
    ) -> KeyPolicy:
        """This policy with new values (None: never expire / no automatic rotation), validated as at creation.

        Session keys are never rotated and their material is handed out: their lifetime stays as created.
        """
        if key_type is KeyType.SESSION and (expire_after, rotation_period) != (self.expire_after, self.rotation_period):
            raise InvalidArgument("update_mask", "a session key's expiry and rotation period are fixed at creation")
        if expire_after is not None:
            _check_duration("expire_after", expire_after, MIN_LIFETIME, MAX_LIFETIME)
        if rotation_period is not None:
            _check_duration("rotation_period", rotation_period, MIN_ROTATION_PERIOD, MAX_ROTATION_PERIOD)
        return KeyPolicy(expire_after=expire_after, rotation_period=rotation_period)

    def check_bounds(self, key_type: KeyType, *, max_session_lifetime: timedelta = MAX_SESSION_KEY_LIFETIME) -> None:
        """Raise InvalidArgument unless this policy is one CreateKey or UpdateKey could have set for a key of
        `key_type` (None: never expires / no automatic rotation, as UpdateKey allows)."""
        if self.expire_after is not None:
            high = max_session_lifetime if key_type is KeyType.SESSION else MAX_LIFETIME
            _check_duration("expire_after", self.expire_after, MIN_LIFETIME, high)
        if self.rotation_period is not None:
            _check_duration("rotation_period", self.rotation_period, MIN_ROTATION_PERIOD, MAX_ROTATION_PERIOD)

    def expiry_for(self, created_at: datetime) -> datetime | None:
        """When a version created at `created_at` stops encrypting."""
        return None if self.expire_after is None else created_at + self.expire_after


@dataclass(frozen=True, slots=True)
class KeyVersion:
    """One generation of a key's material, wrapped under `parent_version` of the parent key."""

    version: int
    created_at: datetime
    expires_at: datetime | None
    parent_version: int
    wrapped_material: bytes = field(repr=False)
    # The RotateKey request id that created this version, if the caller gave one.
    request_id: str | None = None
    # Encryptions made with this version, as flushed to the store by every server (service/usage_budget.py).
    # Outside the integrity tag: see that module for why, and what altering it can do.
    encryptions: int = 0
    # DisableKeyVersion: refuses every use until enabled (domain/key_destruction.py has the rules).
    disabled: bool = False
    # When a scheduled destruction runs; cleared by a cancellation, which restores the state before it.
    destroy_at: datetime | None = None
    # When the version was destroyed: its wrapped material is then empty, everywhere it was stored.
    destroyed_at: datetime | None = None
    # HMAC of the version's immutable metadata (key_integrity.py); its states are in its key's tag.
    integrity_tag: bytes = field(default=b"", repr=False, compare=False)

    @property
    def has_state(self) -> bool:
        """Whether the version is in a state of its own (disabled, scheduled for destruction or destroyed):
        a key always holds those versions, and its integrity tag covers their states."""
        return self.disabled or self.destroy_at is not None or self.destroyed_at is not None

    @property
    def destroyed(self) -> bool:
        return self.destroyed_at is not None

    def state_at(self, now: datetime) -> KeyVersionState:
        if self.destroyed_at is not None:
            return KeyVersionState.DESTROYED
        if self.destroy_at is not None:
            return KeyVersionState.DESTROY_SCHEDULED
        if self.disabled:
            return KeyVersionState.DISABLED
        if self.expires_at is not None and self.expires_at <= now:
            return KeyVersionState.EXPIRED
        return KeyVersionState.ENABLED


@dataclass(frozen=True, slots=True)
class Key:
    """A tenant's key (material wrapped) with the versions it holds.

    A key read from a store holds its primary version and every version in a state of its own (disabled,
    scheduled for destruction, destroyed): what deciding about the key needs, however many versions it has.
    Any other version is read when it is used (the keyring, by the version a ciphertext names), and a use case
    that needs them all (an export, destroying a whole key) reads them page by page
    (service/key_versions.py). Versions are 1 to `primary_version`, ascending in `versions`.
    """

    key_id: str
    tenant_id: str
    key_type: KeyType
    disabled: bool
    primary_version: int
    versions: tuple[KeyVersion, ...]
    created_at: datetime
    policy: KeyPolicy
    labels: Mapping[str, str]
    # The key that wraps this key's versions: None for a master key (the root key wraps it).
    parent_key_id: str | None
    # Bumped by the store on every write to the key; lets caches refuse to replace newer state with older.
    revision: int = 0
    algorithm: Algorithm = Algorithm.AES_256_GCM
    # HMAC of the metadata under the store's metadata key (key_integrity.py); checked on every load.
    integrity_tag: bytes = field(default=b"", repr=False, compare=False)
    # Versions below it refuse to decrypt (disabled, not destroyed); 0 (or 1): none do. At most the primary.
    min_decryption_version: int = 0

    @property
    def primary(self) -> KeyVersion:
        version = self.version(self.primary_version)
        assert version is not None, "a key always holds its primary version"
        return version

    @property
    def latest_version(self) -> int:
        return self.versions[-1].version

    @property
    def expires_at(self) -> datetime | None:
        return self.primary.expires_at

    def same_creation_as(
        self, key_type: KeyType, policy: KeyPolicy, labels: Mapping[str, str], algorithm: Algorithm
    ) -> bool:
        """Whether a CreateKey with these parameters would have made this key (an idempotent repeat)."""
        return (
            self.key_type is key_type
            and self.policy == policy
            and dict(self.labels) == dict(labels)
            and self.algorithm is algorithm
        )

    def version(self, number: int) -> KeyVersion | None:
        # Versions are 1..n in order, so the number is the index plus one.
        if 1 <= number <= len(self.versions):
            candidate = self.versions[number - 1]
            if candidate.version == number:
                return candidate
        return next((v for v in self.versions if v.version == number), None)

    @property
    def next_rotation_at(self) -> datetime | None:
        """When automatic rotation gives this key a new primary; None when it never does (no rotation period,
        a session key, or a disabled key: rotation resumes, at once if overdue, when it is enabled)."""
        period = self.policy.rotation_period
        if period is None or self.disabled or self.key_type is KeyType.SESSION:
            return None
        primary = self.primary
        if primary.destroy_at is not None or primary.destroyed:
            return None  # a key being destroyed gets no fresh primary
        due = primary.created_at + period
        if primary.expires_at is not None:
            lead = min(EXPIRY_ROTATION_LEAD, (primary.expires_at - primary.created_at) / 10)
            due = min(due, primary.expires_at - lead)
        return to_key_precision(due)

    def rotation_due(self, now: datetime) -> bool:
        due = self.next_rotation_at
        return due is not None and due <= now

    def state_at(self, now: datetime) -> KeyState:
        """The key's effective state: DESTROYED or DESTROY_SCHEDULED by its primary version's destruction, else as
        KEY_STATE_RULE defines it (the rule the stores translate for ListKeys' filter, which takes only those
        three states)."""
        primary = self.primary
        if primary.destroyed:
            return KeyState.DESTROYED
        if primary.destroy_at is not None:
            return KeyState.DESTROY_SCHEDULED
        expired = primary.state_at(now) is KeyVersionState.EXPIRED
        return next(condition.state for condition in KEY_STATE_RULE if condition.holds(self.disabled, expired))

    def version_state_at(self, version: KeyVersion, now: datetime) -> KeyVersionState:
        """A version's effective state: its own, or DISABLED below the key's min_decryption_version."""
        state = version.state_at(now)
        if version.version < self.min_decryption_version and state in (
            KeyVersionState.ENABLED,
            KeyVersionState.EXPIRED,
        ):
            return KeyVersionState.DISABLED
        return state

    @property
    def next_destruction_at(self) -> datetime | None:
        """When the earliest scheduled destruction of a version runs; None when none is scheduled."""
        due = [v.destroy_at for v in self.versions if v.destroy_at is not None and not v.destroyed]
        return min(due) if due else None

    @property
    def holds_every_version(self) -> bool:
        return len(self.versions) == self.primary_version

    def as_stored(self) -> Key:
        """The key holding what a store read gives it: its primary and the versions with a state of their own."""
        held = tuple(v for v in self.versions if v.version == self.primary_version or v.has_state)
        return self if len(held) == len(self.versions) else replace(self, versions=held)

    def with_versions(self, versions: Iterable[KeyVersion]) -> Key:
        """The key holding `versions` too (a version already held is replaced by the one given)."""
        merged = {v.version: v for v in self.versions}
        merged.update((v.version, v) for v in versions)
        return replace(self, versions=tuple(merged[number] for number in sorted(merged)))

    def with_new_primary(self, version: KeyVersion) -> Key:
        return replace(self, primary_version=version.version, versions=(*self.versions, version))

    def with_disabled(self, disabled: bool) -> Key:
        return replace(self, disabled=disabled)

    def with_settings(self, policy: KeyPolicy, labels: Mapping[str, str]) -> Key:
        return replace(self, policy=policy, labels=labels)
