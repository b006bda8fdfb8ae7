"""Version states beyond expiry: disabled versions, min_decryption_version, and scheduled destruction.

A version refuses every use while it is disabled (DisableKeyVersion), below
the key's `min_decryption_version`, or scheduled for destruction; each of these
is undone without loss. A scheduled destruction runs after a waiting period
(1-30 days, default 7) unless cancelled first; when it runs the version's
wrapped material is erased from every store and only its metadata remains, in
state DESTROYED. The primary version is never disabled or destroyed alone: the
key would have nothing to encrypt with; destroying the whole key schedules
every version, the primary included.

A tenant is destroyed (crypto-shredded) through its master key: every master
version scheduled means the tenant is scheduled, and its keys refuse every use;
a destroyed master key means every key under it is unrecoverable, and the
tenant takes no new keys (the master key's record stays, so none is created
implicitly).

Every function here returns a new Key; the caller stores it (compare-and-set on
its revision) and so the integrity tag covers each state.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta

from crypto_server.domain.errors import (
    InvalidArgument,
    KeyVersionDestroyed,
    KeyVersionDisabled,
    KeyVersionStateConflict,
    TenantDestroyed,
    TenantDestructionScheduled,
)
from crypto_server.domain.keys import Key, KeyType, KeyVersion, to_key_precision

DEFAULT_WAITING_PERIOD = timedelta(days=7)
MIN_WAITING_PERIOD = timedelta(days=1)
MAX_WAITING_PERIOD = timedelta(days=30)


def destruction_time(now: datetime, waiting_period: timedelta | None) -> datetime:
    """When a destruction scheduled at `now` runs; the period (None: the default) must be 1-30 days."""
    period = DEFAULT_WAITING_PERIOD if waiting_period is None else waiting_period
    if not MIN_WAITING_PERIOD <= period <= MAX_WAITING_PERIOD:
        raise InvalidArgument(
            "waiting_period",
            f"must be between {MIN_WAITING_PERIOD.total_seconds():.0f}s (1 day) and "
            f"{MAX_WAITING_PERIOD.total_seconds():.0f}s (30 days); unset means 7 days",
        )
    return to_key_precision(now + period)


# -- using a version ---------------------------------------------------------------


def _refuse_unusable(key: Key, record: KeyVersion) -> None:
    if record.destroyed:
        raise KeyVersionDestroyed(key.key_id, record.version)
    if record.destroy_at is not None:
        raise KeyVersionDisabled(
            key.key_id,
            record.version,
            f"is scheduled for destruction at {record.destroy_at.isoformat()} and refuses every use meanwhile; "
            "CancelKeyDestruction restores it",
        )
    if record.disabled:
        raise KeyVersionDisabled(key.key_id, record.version, "is disabled; EnableKeyVersion to use it again")


def check_can_decrypt(key: Key, record: KeyVersion) -> None:
    """Raise unless `record` (a version of `key`) may open what it made: not destroyed, scheduled,
    disabled, nor below the key's min_decryption_version."""
    _refuse_unusable(key, record)
    if record.version < key.min_decryption_version:
        raise KeyVersionDisabled(
            key.key_id,
            record.version,
            f"is below the key's min_decryption_version ({key.min_decryption_version}) and no longer decrypts; "
            "lower min_decryption_version with UpdateKey to decrypt with it again",
        )


def check_can_encrypt(key: Key) -> None:
    """Raise unless the primary version may encrypt as far as destruction is concerned (it is never below
    min_decryption_version, and never disabled alone; a key scheduled for destruction has it scheduled)."""
    _refuse_unusable(key, key.primary)


def check_master_usable(master: Key) -> None:
    """Raise when the tenant of `master` (its master key) is destroyed or scheduled for destruction."""
    primary = master.primary
    if primary.destroyed:
        raise TenantDestroyed(master.tenant_id)
    if primary.destroy_at is not None:
        raise TenantDestructionScheduled(master.tenant_id)


def check_can_rotate(key: Key) -> None:
    """A key whose primary is scheduled for destruction (the whole key is) or destroyed gets no new version:
    it would bring the key back to life behind its owner's back."""
    primary = key.primary
    if primary.destroyed:
        raise KeyVersionDestroyed(key.key_id, primary.version)
    if primary.destroy_at is not None:
        raise KeyVersionStateConflict(
            key.key_id,
            f"key {key.key_id} is scheduled for destruction; CancelKeyDestruction before rotating it",
        )


# -- changing states -----------------------------------------------------------------


def _record(key: Key, number: int) -> KeyVersion:
    record = key.version(number) if number > 0 else None
    if record is None:
        raise InvalidArgument("version", f"key {key.key_id} has no version {number} (versions 1-{key.latest_version})")
    return record


def _with_version(key: Key, updated: KeyVersion) -> Key:
    return replace(key, versions=tuple(updated if v.version == updated.version else v for v in key.versions))


def with_version_disabled(key: Key, number: int, disabled: bool) -> Key:
    """DisableKeyVersion / EnableKeyVersion. The primary cannot be disabled; a destroyed version stays so."""
    record = _record(key, number)
    if record.destroyed:
        raise KeyVersionStateConflict(key.key_id, f"key {key.key_id} version {number} is destroyed; it stays so")
    if disabled and number == key.primary_version:
        raise KeyVersionStateConflict(
            key.key_id,
            f"version {number} is key {key.key_id}'s primary version and cannot be disabled; rotate the key first "
            "(or DisableKey to stop the whole key)",
        )
    if not disabled and number < key.min_decryption_version:
        raise KeyVersionStateConflict(
            key.key_id,
            f"key {key.key_id} version {number} is below min_decryption_version ({key.min_decryption_version}); "
            "lower that with UpdateKey to enable it",
        )
    return _with_version(key, replace(record, disabled=disabled))


def with_min_decryption_version(key: Key, minimum: int) -> Key:
    if key.key_type is KeyType.MASTER and minimum:
        raise InvalidArgument(
            "min_decryption_version", "a master key's versions all keep unwrapping the keys under them"
        )
    if not 0 <= minimum <= key.primary_version:
        raise InvalidArgument(
            "min_decryption_version",
            f"must be between 0 (none) and the primary version ({key.primary_version}); versions below it refuse "
            "to decrypt",
        )
    return replace(key, min_decryption_version=minimum)


def with_version_destruction_scheduled(key: Key, number: int, destroy_at: datetime) -> Key:
    """Schedule one version. Not the primary (the key would have nothing to encrypt with): rotate first.
    A version already scheduled keeps its time."""
    record = _record(key, number)
    if record.destroyed:
        raise KeyVersionStateConflict(key.key_id, f"key {key.key_id} version {number} is already destroyed")
    if number == key.primary_version:
        raise KeyVersionStateConflict(
            key.key_id,
            f"version {number} is key {key.key_id}'s primary version and cannot be destroyed on its own; rotate "
            "the key so that another version is primary, or ScheduleKeyDestruction to destroy the whole key",
        )
    if record.destroy_at is not None:
        return key
    return _with_version(key, replace(record, destroy_at=destroy_at))


def with_key_destruction_scheduled(key: Key, destroy_at: datetime) -> Key:
    """Schedule every version not yet destroyed (one already scheduled keeps an earlier time)."""
    if key.primary.destroyed:
        raise KeyVersionStateConflict(key.key_id, f"key {key.key_id} is already destroyed")
    return replace(
        key,
        versions=tuple(
            v
            if v.destroyed or (v.destroy_at is not None and v.destroy_at <= destroy_at)
            else replace(v, destroy_at=destroy_at)
            for v in key.versions
        ),
    )


def with_destruction_cancelled(key: Key, number: int = 0) -> Key:
    """Cancel the scheduled destruction of version `number` (0: of every scheduled version); each returns to
    the state it had before (its disabled flag was never touched)."""
    if number:
        record = _record(key, number)
        if record.destroyed:
            raise KeyVersionStateConflict(
                key.key_id, f"key {key.key_id} version {number} is already destroyed; a destruction cannot be undone"
            )
        if record.destroy_at is None:
            raise KeyVersionStateConflict(
                key.key_id, f"key {key.key_id} version {number} is not scheduled for destruction"
            )
        return _with_version(key, replace(record, destroy_at=None))
    scheduled = [v for v in key.versions if v.destroy_at is not None and not v.destroyed]
    if not scheduled:
        destroyed = key.primary.destroyed
        raise KeyVersionStateConflict(
            key.key_id,
            f"key {key.key_id} is already destroyed; a destruction cannot be undone"
            if destroyed
            else f"key {key.key_id} has no version scheduled for destruction",
        )
    return replace(
        key,
        versions=tuple(replace(v, destroy_at=None) if v in scheduled else v for v in key.versions),
    )


def due_versions(key: Key, now: datetime) -> list[int]:
    """The versions whose scheduled destruction has come."""
    return [v.version for v in key.versions if v.destroy_at is not None and not v.destroyed and v.destroy_at <= now]


def with_versions_destroyed(key: Key, numbers: Iterable[int], now: datetime) -> Key:
    """The versions destroyed at `now`: material erased (empty), metadata kept."""
    chosen = {number for number in numbers if (record := key.version(number)) is not None and not record.destroyed}
    at = to_key_precision(now)
    return replace(
        key,
        versions=tuple(
            replace(v, wrapped_material=b"", destroyed_at=at) if v.version in chosen else v for v in key.versions
        ),
    )
