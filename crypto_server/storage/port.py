"""The storage port: what the service needs from a key store.

Adapters (embedded SQLite here; MongoDB next) store keys exactly as the domain
hands them over: material only ever wrapped. They raise the domain's
StoreUnavailable when the store cannot be reached, never a driver exception.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import NamedTuple, Protocol

from crypto_server.domain.keys import Key, KeyState, KeyType, KeyVersion

log = logging.getLogger(__name__)


class DuplicateMasterKey(Exception):
    """insert_key was given a master key for a tenant that already has one."""


class DuplicateKeyId(Exception):
    """insert_key was given a key id that exists already (an idempotent CreateKey repeated)."""


@dataclass(frozen=True, slots=True)
class ListCursor:
    """Position after the last key of a page, in (created_at, key_id) order."""

    created_at: datetime
    key_id: str


@dataclass(frozen=True, slots=True)
class KeyQuery:
    """One page of a tenant's keys, oldest first.

    `state` filters on the effective state at `now`: EXPIRED means enabled but
    with an expired primary version.
    """

    tenant_id: str
    limit: int
    now: datetime
    key_type: KeyType | None = None
    state: KeyState | None = None
    after: ListCursor | None = None


@dataclass(frozen=True, slots=True)
class KeyChange:
    """A key written at `changed_at` (the writer's wall clock), now at `revision`."""

    tenant_id: str
    key_id: str
    key_type: KeyType
    revision: int
    changed_at: datetime


@dataclass(frozen=True, slots=True)
class CachedCopy:
    """A copy of a key that a cache shared by the servers (Redis) served, at `revision`: checked against the
    store's latest change of the key by the change poller (service/change_poller.py)."""

    tenant_id: str
    key_id: str
    key_type: KeyType
    revision: int


class VersionRef(NamedTuple):
    """One version of one key."""

    tenant_id: str
    key_id: str
    version: int


@dataclass(frozen=True, slots=True)
class KeyCounts:
    by_type_and_state: dict[tuple[KeyType, KeyState], int]
    tenants: int


class KeyReader(Protocol):
    """Reading keys: what serving a request needs (the keyring, the lifecycle)."""

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        """The key, or None when this tenant has no such key. It holds its primary version and every version in
        a state of its own (`KeyVersion.has_state`), each with its tag, whatever else it has (domain/keys.py):
        one read whose cost does not grow with the key's versions."""
        ...

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        """Up to `limit` of the key's versions numbered above `after_version` and at most its primary (a pending
        version is not part of the key), ascending, each as get_key would hold it; [] when the tenant has no
        such key. One indexed range read."""
        ...

    def version_for_request(self, tenant_id: str, key_id: str, request_id: str) -> KeyVersion | None:
        """The key's version made by the RotateKey with `request_id`, if there is one (at most the primary)."""
        ...

    def get_master_key(self, tenant_id: str) -> Key | None: ...

    def list_keys(self, query: KeyQuery) -> list[Key]:
        """One page of keys; `query.state` is matched as domain/keys.py KEY_STATE_RULE says."""
        ...


class KeyWriter(Protocol):
    """Writing keys: creation, rotation and settings, each a compare-and-set on the key's revision."""

    def insert_key(self, key: Key) -> None:
        """Store a new key with its versions. Raises DuplicateKeyId, else DuplicateMasterKey."""
        ...

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        """Store `updated.primary` (its last version, one more than the key's latest) as the key's new
        primary, with `updated`'s integrity tag, only if the key is still at `expected_revision` and
        no version has that number or request id. Returns False when another writer got there first
        (the caller reloads and retries)."""
        ...

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        """Store `updated`'s disabled flag, policy, labels, min_decryption_version and integrity tag, only if the
        key is still at `expected_revision`. Returns False when another writer changed the key first."""
        ...

    def store_tags(self, updated: Key, expected_revision: int) -> bool:
        """Store the integrity tag of `updated` (holding every version) and of each of its versions, only if the
        key is still at `expected_revision`: a key tagged before versions had tags of their own
        (domain/key_integrity.py). Nothing else changes."""
        ...

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        """A version written by a rotation that never made it primary (a writer that stopped between its
        two writes), if the store can hold one: a later rotation finishes it instead of failing on it."""
        ...

    def update_version_states(self, updated: Key, expected_revision: int) -> bool:
        """Store each version's state (`disabled`, `destroy_at`, `destroyed_at`), the key's
        min_decryption_version, integrity tag, next rotation time and next destruction time
        (`Key.next_destruction_at`, indexed, outside the tag like the rotation schedule), only if the key is still
        at `expected_revision`. Returns False when another writer changed the key first.

        Every version with `destroyed_at` has its wrapped material erased wherever the store keeps it (and
        any pending version above a destroyed primary is deleted), on every call: a call repeated after a
        failure part-way finishes the erasure."""
        ...


class KeyServing(KeyReader, KeyWriter, Protocol):
    """The roles that read and write key records: the ones the Redis cache and the integrity check wrap
    (app.py wires every other role to the store directly)."""


class RotationSchedule(Protocol):
    """The rotator's index of when each key is next rotated: a schedule, not a permission."""

    def keys_due_for_rotation(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """(tenant_id, key_id) of up to `limit` keys whose stored next rotation time is at or before `now`,
        earliest first. Every write stores `Key.next_rotation_at` beside the key (indexed, outside the
        integrity tag: a schedule, not a permission); the rotator re-checks each key's authenticated metadata."""
        ...

    def reschedule_rotation(
        self, tenant_id: str, key_id: str, expected_revision: int, next_rotation_at: datetime | None
    ) -> None:
        """Correct a key's stored next rotation time (a row written before there was one, or altered) without
        a revision: nothing a reader relies on changes."""
        ...


class DestructionSchedule(Protocol):
    """The destroyer's index of when each key's next scheduled destruction runs (domain/key_destruction.py)."""

    def keys_due_for_destruction(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """(tenant_id, key_id) of up to `limit` keys whose stored next destruction time is at or before `now`,
        earliest first; the caller re-checks each key's authenticated metadata."""
        ...


# How many give-back ids a version remembers (UsageCounters.give_back_encryptions): enough for the driver's own
# re-send of a give-back, and for a server's next-pass send of one the store never received.
GIVE_BACK_IDS_KEPT = 32


# The largest encryption count a version can report (the API's count is a uint64).
_MAX_COUNT = 2**64 - 1


def stored_encryption_count(stored: int | None, key_id: str | None, version: int) -> int:
    """A version's encryption count as the adapters read it: a count outside 0..2^64-1 (written by a bug, or by
    someone with access to the store) is read as the nearest bound, logged, rather than failing every reading of
    the key, and with it every listing of its tenant. A count read as 0 lets the version go past its limit by
    what was lost; the count is outside the integrity tag (service/usage_budget.py says what that allows)."""
    count = stored or 0
    if 0 <= count <= _MAX_COUNT:
        return count
    log.error(
        "a key version's stored encryption count is out of range; read as the nearest bound",
        extra={"key_id": key_id, "version": version, "count": count},
    )
    return min(max(count, 0), _MAX_COUNT)


@dataclass(frozen=True, slots=True)
class Reservation:
    """What reserve_encryptions granted: `granted` uses, and the version's stored total after it (every
    server's used and reserved encryptions)."""

    granted: int
    total: int


class UsageCounters(Protocol):
    """Encryptions per key version, reserved in blocks by every server (service/usage_budget.py)."""

    def reserve_encryptions(self, version: VersionRef, wanted: int, limit: int) -> Reservation | None:
        """Add min(wanted, limit - stored) (never below 0) to the version's stored `encryptions` in one atomic
        step, so that however many servers reserve at once the stored count never passes `limit` through a
        reservation, and return what was granted with the new total; None if the version is not stored.
        Outside the integrity tag and the revision, like add_encryptions."""
        ...

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        """Add each count (>= 0) to its version's stored `encryptions` as an atomic increment (several servers
        write at once: none may lose another's counts), all in one round trip where the store allows; return the
        new totals. Zero reads the totals. A version no longer stored is left out. Counts are outside the
        integrity tag and the revision: nothing a reader caches changes (service/usage_budget.py)."""
        ...

    def give_back_encryptions(self, give_back_id: str, counts: Mapping[VersionRef, int]) -> None:
        """Subtract each count (> 0), the unused part of a reservation, from its version's stored `encryptions`
        at most once per `give_back_id`, never below zero. Each version is one atomic conditional step that
        records the id beside the count (the last GIVE_BACK_IDS_KEPT ids per version), so a repeat with the same
        id soon after (the driver's re-send of the write after a dropped connection) leaves a version where it
        already landed alone. A version no longer stored is left out. The caller never repeats a give-back whose
        outcome it does not know after the ids may have been forgotten (service/usage_budget.py)."""
        ...

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        """Set the key's stored next rotation time to `now` if `version` is still its primary (a version at its
        usage soft limit); the rotator re-checks the count in the key it loads."""
        ...


class Leases(Protocol):
    """Named leases: one holder at a time across every server (the rotator's)."""

    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        """Take or renew the lease `name` for `holder` until `now + ttl`; False while another holder's lease
        is unexpired. One holder at a time, however many servers ask (an atomic write in the store)."""
        ...

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease up at once (a clean shutdown), if `holder` still holds it."""
        ...


class ChangeFeed(Protocol):
    def changed_keys(self, since: datetime) -> list[KeyChange]:
        """Keys written at or after `since` (every write records when): how each server learns of changes
        made by others, whatever happens to Redis. Cheap: an indexed range of a few recent keys."""
        ...

    def latest_changes(self, keys: Sequence[tuple[str, str]]) -> list[KeyChange]:
        """The latest change (revision, when) of each key named by (tenant_id, key_id) that the store holds:
        what a copy of a key served by a cache is checked against. Cheap: reads by primary key, a few hundred
        at a time, only the fields of a KeyChange."""
        ...


class StoreMeta(Protocol):
    """The store's own records (the wrapped metadata key), and whether it holds keys at all."""

    def get_meta(self, name: str) -> bytes | None:
        """A value of the store's own metadata (the wrapped metadata key), or None."""
        ...

    def add_meta(self, name: str, value: bytes) -> bytes:
        """Store `value` under `name` unless one exists; return the stored one."""
        ...

    def replace_meta(self, name: str, value: bytes) -> None: ...

    def has_keys(self) -> bool:
        """Whether the store holds any key (start-up refuses a keyed store whose checks are missing)."""
        ...


class RootKeyChecks(StoreMeta, Protocol):
    """The check value that proves which root key wrapped the store's keys (start-up, crypto-rewrap-root)."""

    def get_root_key_check(self) -> bytes | None: ...

    def set_root_key_check(self, check: bytes) -> bytes:
        """Store `check` unless one exists; return the stored one."""
        ...

    def replace_root_key_check(self, check: bytes) -> None: ...


class MasterKeyRewrap(Protocol):
    """Re-wrapping master key versions under a new root key (crypto-rewrap-root). It writes key records, so
    the Redis cache wraps it too."""

    def master_keys(self) -> Iterator[Key]:
        """Every tenant's master key (for re-wrapping under a new root key)."""
        ...

    def replace_wrapped_material(self, tenant_id: str, key_id: str, version: int, old: bytes, new: bytes) -> bool:
        """Swap one version's wrapped bytes, only if they are still `old` (same material, new wrapping)."""
        ...


class StoreStats(Protocol):
    def key_counts(self, now: datetime) -> KeyCounts:
        """How many keys there are by type and effective state, and how many tenants have keys (for metrics)."""
        ...


class Health(Protocol):
    def ping(self) -> None:
        """Raise StoreUnavailable unless the store answers and takes a small write now (cheap; for health)."""
        ...


class KeyStore(
    KeyServing,
    RotationSchedule,
    DestructionSchedule,
    UsageCounters,
    Leases,
    ChangeFeed,
    RootKeyChecks,
    MasterKeyRewrap,
    StoreStats,
    Health,
    Protocol,
):
    """Every role: what a store adapter (SQLite, MongoDB) and the circuit breaker above it implement.
    Each component asks only for the roles it uses."""

    def close(self) -> None: ...


class Invalidation(Protocol):
    """Tells every server sharing the store that a key changed, so none keeps using the old state."""

    def key_changed(self, tenant_id: str, key_id: str) -> None: ...

    def tenant_changed(self, tenant_id: str) -> None:
        """Every key of the tenant must be reloaded (its master key changed state)."""
        ...


class InvalidationListener(Protocol):
    """What an invalidation delivers to, on every server (the keyring)."""

    def forget(self, tenant_id: str, key_id: str) -> None: ...

    def forget_tenant(self, tenant_id: str) -> None: ...

    def forget_all(self) -> None:
        """Messages may have been missed (the channel was down): drop everything."""
        ...


class LocalInvalidation:
    """A single server: invalidations only need to reach this process's listener."""

    def __init__(self, listener: InvalidationListener) -> None:
        self._listener = listener

    def key_changed(self, tenant_id: str, key_id: str) -> None:
        self._listener.forget(tenant_id, key_id)

    def tenant_changed(self, tenant_id: str) -> None:
        self._listener.forget_tenant(tenant_id)
