"""The key store behind a circuit breaker and a bulkhead, so an outage costs callers milliseconds, not workers.

Every call of the threaded server runs on one of a fixed number of workers. A
database that hangs (frozen, partitioned) holds each caller for the whole store
timeout; enough of them and no worker is left for cached Encrypt/Decrypt or for
health checks — a liveness probe then restarts the process and throws away the
keys in memory that kept encryption working. Two guards prevent that:

- **Bulkhead.** At most `max_concurrent` calls are inside the store at once
  (default: half the workers); a call finding no place waits up to a quarter
  of a second for one, then fails `StoreCallRefused` (with a RetryInfo of that
  wait). So however the store behaves, the remaining workers stay free. Every
  caller may wait, background work included (the change poller, usage-budget
  flushes): a store that is merely busy must not make them skip their turn.
- **Circuit breaker.** Once a call finds the store unreachable (not merely
  unable to write: a full disk still serves reads), calls fail at once
  (`StoreCallRefused`, naming the wait) for `open_s`; then one call at a time
  probes it, and the first success closes the circuit. The health monitor's
  periodic ping is a probe too, so recovery is noticed without any caller.
  The call that found the store failing is told to retry in `open_s` too (a
  RetryInfo on every refusal, the first included), as is one the store
  refused to write.

It sits directly on the database adapter, below the Redis cache: keys Redis
holds are still served while the database is down.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timedelta
from typing import TypeVar

from crypto_server.domain.errors import StoreCallRefused, StoreUnavailable, StoreWriteRefused
from crypto_server.domain.keys import Key, KeyVersion
from crypto_server.storage.port import KeyChange, KeyCounts, KeyQuery, KeyStore, Reservation, VersionRef

log = logging.getLogger(__name__)
_T = TypeVar("_T")
# How long a call may wait for a place in the bulkhead before it is refused.
_PLACE_WAIT_S = 0.25


class StoreCircuit:
    """A KeyStore that fails fast while the store is down and never lets it hold more than its share of workers."""

    def __init__(
        self,
        inner: KeyStore,
        *,
        max_concurrent: int,
        open_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        place_wait_s: float = _PLACE_WAIT_S,
    ) -> None:
        if max_concurrent < 1 or open_s <= 0:
            raise ValueError("max_concurrent must be >= 1 and open_s > 0")
        self._inner = inner
        self._places = threading.BoundedSemaphore(max_concurrent)
        self._max_concurrent = max_concurrent
        self._open_s = open_s
        self._place_wait_s = place_wait_s
        self._clock = clock
        self._lock = threading.Lock()
        self._open_until: float | None = None  # None: closed
        self._probing = False

    @property
    def is_open(self) -> bool:
        with self._lock:
            return self._open_until is not None

    def _admit(self) -> bool:
        """Whether this call may go to the store; True means it is the probe of an open circuit."""
        with self._lock:
            if self._open_until is None:
                return False
            if self._probing or self._clock() < self._open_until:
                # Until the next probe (or, while one is under way, a moment): a RetryInfo, so a client waits for
                # the probe instead of spending its attempts on refusals.
                wait = max(self._place_wait_s, self._open_until - self._clock())
                raise StoreCallRefused(
                    f"the key store is unreachable; calls that need it fail at once (next try in {wait:.2f}s); "
                    "retry later",
                    retry_after_s=wait,
                )
            self._probing = True
            return True

    def _succeeded(self) -> None:
        with self._lock:
            self._open_until = None
            self._probing = False

    def _failed(self, error: StoreUnavailable) -> None:
        if error.retry_after_s is None:
            # The store's own failure: the circuit tries it again in `open_s` (a store that answers but cannot
            # write gets the same hint), so that is when a caller's retry is worth making — a RetryInfo
            # on every refusal, the first one included.
            error.retry_after_s = self._open_s
        if isinstance(error, StoreWriteRefused):
            # The store answers (reads work), it just cannot write: no reason to fail reads fast.
            return
        with self._lock:
            opening = self._open_until is None
            self._open_until = self._clock() + self._open_s
            self._probing = False
        if opening:
            log.warning(
                "a key store call failed; calls that need the store fail at once until it answers again",
                extra={"detail": error.message, "retry_s": self._open_s},
            )

    def _call(self, operation: Callable[[], _T]) -> _T:
        probe = self._admit()
        try:
            if not self._places.acquire(timeout=self._place_wait_s):
                raise StoreCallRefused(
                    f"{self._max_concurrent} calls are already in the key store; retry later",
                    retry_after_s=self._place_wait_s,
                )
            try:
                result = operation()
            except StoreUnavailable as error:
                self._failed(error)
                raise
            finally:
                self._places.release()
        finally:
            if probe:
                # However the probe ended (refused a place, the store unwritable, a bug): the next call may probe.
                with self._lock:
                    self._probing = False
        if probe or self._open_until is not None:
            self._succeeded()
        return result

    def ping(self) -> None:
        """Always asks the store (the health monitor's probe), and opens or closes the circuit by the answer."""
        try:
            self._inner.ping()
        except StoreUnavailable as error:
            self._failed(error)
            raise
        self._succeeded()

    # -- everything else goes through _call ---------------------------------------------

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        return self._call(lambda: self._inner.get_key(tenant_id, key_id))

    def get_master_key(self, tenant_id: str) -> Key | None:
        return self._call(lambda: self._inner.get_master_key(tenant_id))

    def list_keys(self, query: KeyQuery) -> list[Key]:
        return self._call(lambda: self._inner.list_keys(query))

    def insert_key(self, key: Key) -> None:
        self._call(lambda: self._inner.insert_key(key))

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        return self._call(lambda: self._inner.add_version(updated, expected_revision))

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        return self._call(lambda: self._inner.update_key(updated, expected_revision))

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        return self._call(lambda: self._inner.pending_version(tenant_id, key_id, number))

    def update_version_states(self, updated: Key, expected_revision: int) -> bool:
        return self._call(lambda: self._inner.update_version_states(updated, expected_revision))

    def store_tags(self, updated: Key, expected_revision: int) -> bool:
        return self._call(lambda: self._inner.store_tags(updated, expected_revision))

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        return self._call(lambda: self._inner.list_versions(tenant_id, key_id, after_version, limit))

    def version_for_request(self, tenant_id: str, key_id: str, request_id: str) -> KeyVersion | None:
        return self._call(lambda: self._inner.version_for_request(tenant_id, key_id, request_id))

    def keys_due_for_destruction(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self._call(lambda: self._inner.keys_due_for_destruction(now, limit))

    def master_keys(self) -> Iterator[Key]:
        return self._call(lambda: iter(list(self._inner.master_keys())))

    def replace_wrapped_material(self, tenant_id: str, key_id: str, version: int, old: bytes, new: bytes) -> bool:
        return self._call(lambda: self._inner.replace_wrapped_material(tenant_id, key_id, version, old, new))

    def get_root_key_check(self) -> bytes | None:
        return self._call(self._inner.get_root_key_check)

    def set_root_key_check(self, check: bytes) -> bytes:
        return self._call(lambda: self._inner.set_root_key_check(check))

    def replace_root_key_check(self, check: bytes) -> None:
        self._call(lambda: self._inner.replace_root_key_check(check))

    def get_meta(self, name: str) -> bytes | None:
        return self._call(lambda: self._inner.get_meta(name))

    def add_meta(self, name: str, value: bytes) -> bytes:
        return self._call(lambda: self._inner.add_meta(name, value))

    def replace_meta(self, name: str, value: bytes) -> None:
        self._call(lambda: self._inner.replace_meta(name, value))

    def changed_keys(self, since: datetime) -> list[KeyChange]:
        return self._call(lambda: self._inner.changed_keys(since))

    def latest_changes(self, keys: Sequence[tuple[str, str]]) -> list[KeyChange]:
        return self._call(lambda: self._inner.latest_changes(keys))

    def keys_due_for_rotation(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self._call(lambda: self._inner.keys_due_for_rotation(now, limit))

    def reschedule_rotation(
        self, tenant_id: str, key_id: str, expected_revision: int, next_rotation_at: datetime | None
    ) -> None:
        self._call(lambda: self._inner.reschedule_rotation(tenant_id, key_id, expected_revision, next_rotation_at))

    def reserve_encryptions(self, version: VersionRef, wanted: int, limit: int) -> Reservation | None:
        return self._call(lambda: self._inner.reserve_encryptions(version, wanted, limit))

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        return self._call(lambda: self._inner.add_encryptions(counts))

    def give_back_encryptions(self, give_back_id: str, counts: Mapping[VersionRef, int]) -> None:
        self._call(lambda: self._inner.give_back_encryptions(give_back_id, counts))

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        self._call(lambda: self._inner.mark_rotation_due(version, now))

    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        return self._call(lambda: self._inner.acquire_lease(name, holder, now, ttl))

    def release_lease(self, name: str, holder: str) -> None:
        self._call(lambda: self._inner.release_lease(name, holder))

    def has_keys(self) -> bool:
        return self._call(self._inner.has_keys)

    def key_counts(self, now: datetime) -> KeyCounts:
        return self._call(lambda: self._inner.key_counts(now))

    def close(self) -> None:
        self._inner.close()
