"""Redis in front of the key store: a shared cache of keys and the invalidation channel.

Redis holds only what the store holds — wrapped key material and metadata,
never an unwrapped key — so reading Redis gives nothing the database would not.

Redis is an optimisation, never a dependency: when it cannot be reached,
lookups go to the store, writes still succeed, errors are logged at most once
per interval, and Redis is left alone for a short back-off so that a dead
Redis costs no time per request. Caching resumes by itself when it returns.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar
from urllib.parse import urlparse

import redis
from redis.backoff import NoBackoff
from redis.exceptions import RedisError
from redis.retry import Retry

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.keys import Key, KeyPolicy, KeyType, KeyVersion
from crypto_server.storage.port import InvalidationListener, KeyChange, KeyCounts, KeyQuery, KeyStore, VersionRef

log = logging.getLogger(__name__)
DEFAULT_DB_INDEX = 2
_T = TypeVar("_T")

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


def connect(url: str, *, timeout_s: float) -> redis.Redis:
    """A client that fails fast: one attempt, short timeouts (DB index 2 unless the URL names one)."""
    path = urlparse(url).path.strip("/")
    extra: dict[str, Any] = {} if path else {"db": DEFAULT_DB_INDEX}
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(NoBackoff(), 0),
        health_check_interval=10,
        **extra,
    )


class RedisGuard:
    """Runs Redis calls so that an outage degrades instead of failing.

    After a failure, Redis is skipped for `backoff_s`; failures are logged at
    most once per `log_interval_s`, and the recovery once.
    """

    def __init__(
        self, *, backoff_s: float = 1.0, log_interval_s: float = 30.0, on_failure: Callable[[], None] | None = None
    ) -> None:
        self._on_failure = on_failure
        self._backoff_s = backoff_s
        self._log_interval_s = log_interval_s
        self._lock = threading.Lock()
        self._skip_until = 0.0
        self._last_logged = -float("inf")
        self._failing = False

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._skip_until

    def call(self, operation: str, action: Callable[[], _T], fallback: _T) -> _T:
        if not self.available:
            return fallback
        try:
            result = action()
        except RedisError as error:
            self.failed(operation, error)
            return fallback
        self.succeeded()
        return result

    def failed(self, operation: str, error: Exception) -> None:
        if self._on_failure is not None:
            self._on_failure()
        now = time.monotonic()
        with self._lock:
            self._skip_until = now + self._backoff_s
            self._failing = True
            if now - self._last_logged < self._log_interval_s:
                return
            self._last_logged = now
        log.warning(
            "redis unavailable; serving from the key store",
            extra={"operation": operation, "error": type(error).__name__, "detail": str(error)[:200]},
        )

    def succeeded(self) -> None:
        if self._failing:
            with self._lock:
                recovered, self._failing = self._failing, False
            if recovered:
                log.info("redis reachable again; caching resumed")


def _encode_key(key: Key) -> str:
    def moment(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    def millis(value: timedelta | None) -> int | None:
        return None if value is None else value // timedelta(milliseconds=1)

    return json.dumps(
        {
            "key_id": key.key_id,
            "tenant_id": key.tenant_id,
            "key_type": key.key_type.value,
            "disabled": key.disabled,
            "primary_version": key.primary_version,
            "created_at": moment(key.created_at),
            "expire_after_ms": millis(key.policy.expire_after),
            "rotation_period_ms": millis(key.policy.rotation_period),
            "labels": dict(key.labels),
            "parent_key_id": key.parent_key_id,
            "revision": key.revision,
            "algorithm": key.algorithm.value,
            "integrity_tag": base64.b64encode(key.integrity_tag).decode(),
            "versions": [
                {
                    "version": v.version,
                    "created_at": moment(v.created_at),
                    "expires_at": moment(v.expires_at),
                    "parent_version": v.parent_version,
                    "wrapped_material": base64.b64encode(v.wrapped_material).decode(),
                    "request_id": v.request_id,
                    "encryptions": v.encryptions,
                }
                for v in key.versions
            ],
        },
        separators=(",", ":"),
    )


def _decode_key(text: bytes) -> Key:
    data = json.loads(text)

    def moment(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    def millis(value: int | None) -> timedelta | None:
        return None if value is None else timedelta(milliseconds=value)

    return Key(
        key_id=data["key_id"],
        tenant_id=data["tenant_id"],
        key_type=KeyType(data["key_type"]),
        disabled=data["disabled"],
        primary_version=data["primary_version"],
        versions=tuple(
            KeyVersion(
                version=v["version"],
                created_at=datetime.fromisoformat(v["created_at"]),
                expires_at=moment(v["expires_at"]),
                parent_version=v["parent_version"],
                wrapped_material=base64.b64decode(v["wrapped_material"]),
                request_id=v.get("request_id"),
                encryptions=v.get("encryptions", 0),
            )
            for v in data["versions"]
        ),
        created_at=datetime.fromisoformat(data["created_at"]),
        policy=KeyPolicy(millis(data["expire_after_ms"]), millis(data["rotation_period_ms"])),
        labels=data["labels"],
        parent_key_id=data["parent_key_id"],
        revision=data["revision"],
        algorithm=Algorithm(data.get("algorithm", Algorithm.AES_256_GCM.value)),
        integrity_tag=base64.b64decode(data.get("integrity_tag", "")),
    )


class RedisCachedKeyStore:
    """A KeyStore that answers key lookups from Redis first (cache-aside) and
    writes changed keys through to Redis, around any other KeyStore."""

    def __init__(self, inner: KeyStore, client: redis.Redis, namespace: str, *, ttl_s: float, guard: RedisGuard):
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

    def _name(self, tenant_id: str, key_id: str) -> str:
        return f"{self._prefix}{tenant_id}:{key_id}"

    def _put(self, key: Key) -> None:
        name = self._name(key.tenant_id, key.key_id)

        def put() -> bool:
            self._put_if_newer(keys=[name], args=[key.revision, _encode_key(key), self._ttl_ms])
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
            return _decode_key(cached)  # type: ignore[arg-type]
        key = self._inner.get_key(tenant_id, key_id)
        if key is not None:
            self._put(key)
        return key

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
        fresh = self._inner.get_key(tenant_id, key_id)
        if fresh is not None:
            self._put(fresh)

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        if not self._inner.add_version(updated, expected_revision):
            # The caller read an older revision than the store's, perhaps from here: never again.
            self._distrust(self._name(updated.tenant_id, updated.key_id))
            return False
        self._refresh(updated.tenant_id, updated.key_id)
        return True

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        if not self._inner.update_key(updated, expected_revision):
            self._distrust(self._name(updated.tenant_id, updated.key_id))
            return False
        self._refresh(updated.tenant_id, updated.key_id)
        return True

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        return self._inner.pending_version(tenant_id, key_id, number)

    def get_meta(self, name: str) -> bytes | None:
        return self._inner.get_meta(name)

    def add_meta(self, name: str, value: bytes) -> bytes:
        return self._inner.add_meta(name, value)

    def replace_meta(self, name: str, value: bytes) -> None:
        self._inner.replace_meta(name, value)

    def changed_keys(self, since: datetime) -> list[KeyChange]:
        return self._inner.changed_keys(since)

    def keys_due_for_rotation(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self._inner.keys_due_for_rotation(now, limit)

    def reschedule_rotation(
        self, tenant_id: str, key_id: str, expected_revision: int, next_rotation_at: datetime | None
    ) -> None:
        # The schedule is not part of a cached key: nothing here to refresh.
        self._inner.reschedule_rotation(tenant_id, key_id, expected_revision, next_rotation_at)

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        # Counts are not invalidated here: a cached key's counts trail the store's (the budget keeps the totals).
        return self._inner.add_encryptions(counts)

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        self._inner.mark_rotation_due(version, now)
        # The rotator decides by the primary's count in the key it loads, and a cached copy's counts trail the
        # store's: left in Redis, it would show the key under its soft limit and the rotator would reschedule
        # it instead of rotating it (until the entry expired, long after the hard limit had stopped encryption).
        self._distrust(self._name(version.tenant_id, version.key_id))

    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        return self._inner.acquire_lease(name, holder, now, ttl)

    def release_lease(self, name: str, holder: str) -> None:
        self._inner.release_lease(name, holder)

    def has_keys(self) -> bool:
        return self._inner.has_keys()

    def insert_key(self, key: Key) -> None:
        self._inner.insert_key(key)

    def get_master_key(self, tenant_id: str) -> Key | None:
        return self._inner.get_master_key(tenant_id)

    def list_keys(self, query: KeyQuery) -> list[Key]:
        return self._inner.list_keys(query)

    def get_root_key_check(self) -> bytes | None:
        return self._inner.get_root_key_check()

    def master_keys(self) -> Iterator[Key]:
        return self._inner.master_keys()

    def replace_wrapped_material(self, tenant_id: str, key_id: str, version: int, old: bytes, new: bytes) -> bool:
        if not self._inner.replace_wrapped_material(tenant_id, key_id, version, old, new):
            return False
        self._refresh(tenant_id, key_id)
        return True

    def replace_root_key_check(self, check: bytes) -> None:
        self._inner.replace_root_key_check(check)

    def set_root_key_check(self, check: bytes) -> bytes:
        return self._inner.set_root_key_check(check)

    def ping(self) -> None:
        self._inner.ping()

    def key_counts(self, now: datetime) -> KeyCounts:
        return self._inner.key_counts(now)

    def close(self) -> None:
        self._inner.close()
        self._client.close()


class RedisInvalidation:
    """Invalidation across servers over Redis pub/sub.

    The local listener is told at once (a change takes effect immediately on
    the server that made it); every other server hears it on the channel.
    While the channel is down messages may be missed, so on reconnecting the
    listener drops everything and reloads.
    """

    def __init__(
        self, client: redis.Redis, namespace: str, listener: InvalidationListener, *, guard: RedisGuard
    ) -> None:
        self._client = client
        self._channel = f"caas:crypto:{namespace}:invalidate"
        self._listener = listener
        self._guard = guard
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="redis-invalidation", daemon=True)
        self._thread.start()

    def key_changed(self, tenant_id: str, key_id: str) -> None:
        self._listener.forget(tenant_id, key_id)
        self._publish({"tenant_id": tenant_id, "key_id": key_id})

    def tenant_changed(self, tenant_id: str) -> None:
        self._listener.forget_tenant(tenant_id)
        self._publish({"tenant_id": tenant_id, "key_id": None})

    def _publish(self, message: dict[str, str | None]) -> None:
        # Not through the guard's back-off: a lost invalidation costs more than a slow write.
        try:
            self._client.publish(self._channel, json.dumps(message))
        except RedisError as error:
            self._guard.failed("publish", error)

    def wait_subscribed(self, timeout_s: float) -> bool:
        return self._subscribed.wait(timeout_s)

    def _deliver(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            tenant_id = message["tenant_id"]
            key_id = message["key_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed invalidation message")
            return
        if key_id is None:
            self._listener.forget_tenant(tenant_id)
        else:
            self._listener.forget(tenant_id, key_id)

    def _listen(self) -> None:
        missed_messages = False
        while not self._stopping.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self._channel)
                if missed_messages:
                    self._listener.forget_all()
                    missed_messages = False
                self._subscribed.set()
                self._guard.succeeded()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except RedisError as error:
                self._subscribed.clear()
                missed_messages = True
                self._guard.failed("subscribe", error)
                self._stopping.wait(0.5)
            finally:
                with contextlib.suppress(RedisError):
                    pubsub.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
