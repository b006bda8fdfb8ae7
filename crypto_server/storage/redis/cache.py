"""The Redis cache (cache-aside, write-through) around the store's key reading and writing roles.

Redis can lose writes it acknowledged: restarted from an RDB snapshot or an AOF that trails it, a failover to a
replica that lagged, a restore from a backup. It then serves older states of keys — a disabled key enabled, an
old primary — at the revision they had, with their full TTL, and nothing in Redis says so. So no copy is served
on trust alone: every copy read from Redis is noted (`take_served_copies`) and checked against the store's
revision of the key at the next change poll, which drops it from memory and deletes it from Redis if the store
has moved on (service/change_poller.py explains the choice). The copy is used meanwhile: at most
CRYPTO_INVALIDATION_INTERVAL plus a store round trip.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from datetime import datetime
from typing import Protocol

import redis
from redis.exceptions import RedisError

from crypto_server.domain.keys import Key, KeyVersion
from crypto_server.storage.port import (
    CachedCopy,
    KeyChange,
    KeyQuery,
    KeyServing,
    MasterKeyRewrap,
    Reservation,
    UsageCounters,
    VersionRef,
)
from crypto_server.storage.redis.guard import RedisGuard
from crypto_server.storage.redis.key_codec import decode_key, encode_key

# Store the entry unless Redis already holds a newer revision of the key, so a
# slow reader can never put back a state older than a writer's.
_PUT_IF_NEWER = """
local current = redis.call('HGET', KEYS[1], 'revision')
if current and tonumber(current) > tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'revision', ARGV[1], 'key', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""


# Delete the entry if it holds an older revision than the store's (a change this server heard of late).
_DELETE_IF_OLDER = """
local current = redis.call('HGET', KEYS[1], 'revision')
if current and tonumber(current) < tonumber(ARGV[1]) then redis.call('DEL', KEYS[1]) end
return 1
"""

# Copies served and not yet taken for checking, at most: past it (nothing takes them: a tool without a change
# poller), Redis is not read, as a copy that will not be checked must not be served.
MAX_UNCHECKED_COPIES = 100_000


class CachedRoles(KeyServing, MasterKeyRewrap, UsageCounters, Protocol):
    """The roles that read or write key records, and the usage counters (whose soft-limit mark must drop the
    cached copy): the ones a cache of keys must see."""


class RedisCachedKeyStore:
    """The key reading and writing roles of a store, answering key lookups from Redis first (cache-aside) and
    writing changed keys through to Redis; and the usage counters, whose soft-limit mark drops the cached copy.
    Nothing else goes through it: app.py wires every other role of the store (schedule, leases, metadata, ...)
    to the store directly."""

    def __init__(self, inner: CachedRoles, client: redis.Redis, namespace: str, *, ttl_s: float, guard: RedisGuard):
        self._inner = inner
        self._client = client
        self._prefix = f"caas:crypto:{namespace}:key:"
        self._ttl_ms = int(ttl_s * 1000)
        self._guard = guard
        self._put_if_newer = client.register_script(_PUT_IF_NEWER)
        self._delete_if_older = client.register_script(_DELETE_IF_OLDER)
        # Entries that may hold an older state than the store (a write could not update them): never read,
        # deleted as soon as Redis answers again.
        self._suspect: set[str] = set()
        self._suspect_lock = threading.Lock()
        # Copies served from Redis since the change poller last took them, per key: the lowest revision served.
        self._served: dict[tuple[str, str], CachedCopy] = {}
        self._served_lock = threading.Lock()

    def _name(self, tenant_id: str, key_id: str) -> str:
        return f"{self._prefix}{tenant_id}:{key_id}"

    def _put(self, key: Key) -> None:
        name = self._name(key.tenant_id, key.key_id)
        key = key.as_stored()  # a whole key (an export, a destruction) is cached as a read would give it

        def put() -> bool:
            self._put_if_newer(keys=[name], args=[key.revision, encode_key(key), self._ttl_ms])
            return True

        if not self._guard.call("put", put, False):
            self._distrust(name)

    def _distrust(self, name: str) -> None:
        """The entry may be older than the store: delete it now, or remember to before any read of Redis.
        Not through the back-off: skipping this delete is how a stale entry would outlive the outage."""
        try:
            self._client.delete(name)
        except RedisError as error:
            self._guard.failed("delete", error)
            with self._suspect_lock:
                self._suspect.add(name)

    def _trusted(self, name: str) -> bool:
        """Whether Redis may be read for `name`: no entry is suspect, or the suspects could be deleted now."""
        with self._suspect_lock:
            if not self._suspect:
                return True
            suspects = list(self._suspect)

        def delete() -> bool:
            self._client.delete(*suspects)
            return True

        if not self._guard.call("delete", delete, False):
            return name not in suspects
        with self._suspect_lock:
            self._suspect.difference_update(suspects)
        return True

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        name = self._name(tenant_id, key_id)
        cached = self._guard.call("get", lambda: self._client.hget(name, "key"), None) if self._trusted(name) else None
        if cached is not None:
            copy = decode_key(cached)  # type: ignore[arg-type]
            if self._served_copy(copy):
                return copy
        key = self._inner.get_key(tenant_id, key_id)
        if key is not None:
            self._put(key)
        return key

    def _served_copy(self, key: Key) -> bool:
        """Note a copy about to be served, for the change poller to check; False when it may not be served (too
        many copies wait unchecked: nothing takes them)."""
        slot = (key.tenant_id, key.key_id)
        with self._served_lock:
            noted = self._served.get(slot)
            if noted is None:
                if len(self._served) >= MAX_UNCHECKED_COPIES:
                    return False
            elif noted.revision <= key.revision:
                return True
            self._served[slot] = CachedCopy(key.tenant_id, key.key_id, key.key_type, key.revision)
        return True

    def take_served_copies(self) -> list[CachedCopy]:
        """The copies served from Redis since the last call, the lowest revision of each key: the change poller
        checks them against the store (a Redis that lost writes serves older states at their old revisions)."""
        with self._served_lock:
            served, self._served = self._served, {}
        return list(served.values())

    def _written(self, write: Callable[[Key, int], bool], updated: Key, expected_revision: int) -> bool:
        """A compare-and-set write of a key record, leaving Redis holding the revision it made.

        Deleting the entry is not enough: a reader that loaded the older state before the write puts it back
        afterwards (put-if-newer finds nothing newer), and every server's change poller handles a revision once,
        so nothing would delete it again before the entry expires. With the new revision in Redis, the older
        one can never be put back. The store counts revisions up by one per write, so the new state is exactly
        `updated` at `expected_revision + 1` (after an erasure it carries no material). When Redis cannot take
        it, the entry is distrusted (deleted now, or never read until it is).
        """
        name = self._name(updated.tenant_id, updated.key_id)
        try:
            written = write(updated, expected_revision)
        except BaseException:
            # Whether the write landed is unknown (a timeout after the commit): the entry may be older.
            self._distrust(name)
            raise
        if written:
            self._put(replace(updated, revision=expected_revision + 1))
        else:
            # The caller read an older revision than the store's, perhaps from here: never again.
            self._distrust(name)
        return written

    def update_version_states(self, updated: Key, expected_revision: int) -> bool:
        return self._written(self._inner.update_version_states, updated, expected_revision)

    def store_tags(self, updated: Key, expected_revision: int) -> bool:
        return self._written(self._inner.store_tags, updated, expected_revision)

    def reserve_encryptions(self, version: VersionRef, wanted: int, limit: int) -> Reservation | None:
        return self._inner.reserve_encryptions(version, wanted, limit)

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        return self._inner.add_encryptions(counts)

    def give_back_encryptions(self, give_back_id: str, counts: Mapping[VersionRef, int]) -> None:
        self._inner.give_back_encryptions(give_back_id, counts)

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        self._inner.mark_rotation_due(version, now)
        # The rotator decides by the primary's count in the key it loads, and a cached copy's counts trail the
        # store's: left in Redis, it would show the key under its soft limit and the rotator would reschedule
        # it instead of rotating it (until the entry expired, long after the hard limit had stopped encryption).
        self._distrust(self._name(version.tenant_id, version.key_id))

    def drop_if_older(self, change: KeyChange) -> bool:
        """Delete the cached copy of a changed key if it predates the change; False when Redis cannot be
        reached now (the caller tries again). Not subject to the back-off: a stale entry outlives it."""
        name = self._name(change.tenant_id, change.key_id)
        try:
            self._delete_if_older(keys=[name], args=[change.revision])
        except RedisError as error:
            self._guard.failed("delete", error)
            with self._suspect_lock:
                self._suspect.add(name)  # not read from Redis until it is deleted
            return False
        self._guard.succeeded()
        return True

    def _refresh(self, tenant_id: str, key_id: str) -> None:
        """After a write without a revision to expect: the store's new state into Redis (put-if-newer, so a
        slow reader's older copy cannot replace it), or the entry distrusted when it cannot be read."""
        try:
            fresh = self._inner.get_key(tenant_id, key_id)
        except BaseException:
            self._distrust(self._name(tenant_id, key_id))
            raise
        if fresh is not None:
            self._put(fresh)

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        return self._written(self._inner.add_version, updated, expected_revision)

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        return self._written(self._inner.update_key, updated, expected_revision)

    # -- not cached (listings, master keys by tenant, versions read on their own): answered by the store ------------

    def get_master_key(self, tenant_id: str) -> Key | None:
        return self._inner.get_master_key(tenant_id)

    def list_keys(self, query: KeyQuery) -> list[Key]:
        return self._inner.list_keys(query)

    def insert_key(self, key: Key) -> None:
        self._inner.insert_key(key)

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        return self._inner.pending_version(tenant_id, key_id, number)

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        return self._inner.list_versions(tenant_id, key_id, after_version, limit)

    def version_for_request(self, tenant_id: str, key_id: str, request_id: str) -> KeyVersion | None:
        return self._inner.version_for_request(tenant_id, key_id, request_id)

    def master_keys(self) -> Iterator[Key]:
        return self._inner.master_keys()

    def replace_wrapped_material(self, tenant_id: str, key_id: str, version: int, old: bytes, new: bytes) -> bool:
        if not self._inner.replace_wrapped_material(tenant_id, key_id, version, old, new):
            return False
        self._refresh(tenant_id, key_id)
        return True
