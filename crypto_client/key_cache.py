"""A small TTL cache of key metadata for get_key, so hot paths need not ask the service every time.

Entries are per (tenant, key id): a client serving many tenants must never answer one tenant's get_key
from another tenant's entry, whatever the key id.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from crypto_client.models import Key


class KeyMetadataCache:
    def __init__(self, ttl_s: float, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, str], tuple[float, Key]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, tenant_id: str, key_id: str) -> Key | None:
        if self._ttl_s <= 0:
            return None
        with self._lock:
            entry = self._entries.get((tenant_id, key_id))
            if entry is None:
                return None
            stored_at, key = entry
            if self._clock() - stored_at >= self._ttl_s:
                del self._entries[(tenant_id, key_id)]
                return None
            return key

    def put(self, tenant_id: str, key: Key) -> None:
        if self._ttl_s <= 0:
            return
        with self._lock:
            self._entries[(tenant_id, key.key_id)] = (self._clock(), key)
            self._entries.move_to_end((tenant_id, key.key_id))
            while len(self._entries) > self._max_entries:
                self._entries.popitem(last=False)

    def forget(self, tenant_id: str, key_id: str) -> None:
        with self._lock:
            self._entries.pop((tenant_id, key_id), None)
