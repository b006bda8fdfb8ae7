"""Data-key caches for EnvelopeCipher and AsyncEnvelopeCipher: none (the default) or one within limits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class _Entry:
    plaintext_key: bytes
    wrapped_key: bytes
    created: float
    messages: int = 0
    bytes_encrypted: int = 0


class NullDataKeyCache:
    """No reuse: every message gets a fresh data key (the default)."""

    def take(self, size: int) -> tuple[bytes, bytes] | None:
        return None

    def put(self, plaintext_key: bytes, wrapped_key: bytes, size: int) -> None:
        return None

    def unwrapped(self, wrapped_key: bytes) -> bytes | None:
        return None

    def remember_unwrapped(self, wrapped_key: bytes, plaintext_key: bytes) -> None:
        return None


class DataKeyCache:
    """Reuse one data key for encryption until any limit is reached; keep unwrapped keys for decryption
    for `max_age_s`. Limits are validated at construction."""

    def __init__(
        self,
        *,
        max_age_s: float = 60.0,
        max_messages: int = 1000,
        max_bytes: int = 64 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_age_s <= 0 or max_messages < 1 or max_bytes < 1:
            raise ValueError("DataKeyCache limits must be positive")
        self._max_age_s = max_age_s
        self._max_messages = max_messages
        self._max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._current: _Entry | None = None
        self._unwrapped: dict[bytes, tuple[float, bytes]] = {}

    def take(self, size: int) -> tuple[bytes, bytes] | None:
        """The current data key if it may encrypt `size` more bytes, counted as used."""
        with self._lock:
            entry = self._current
            if entry is None or not self._admits(entry, size):
                self._current = None
                return None
            entry.messages += 1
            entry.bytes_encrypted += size
            return entry.plaintext_key, entry.wrapped_key

    def _admits(self, entry: _Entry, size: int) -> bool:
        return (
            self._clock() - entry.created < self._max_age_s
            and entry.messages < self._max_messages
            and entry.bytes_encrypted + size <= self._max_bytes
        )

    def put(self, plaintext_key: bytes, wrapped_key: bytes, size: int) -> None:
        with self._lock:
            self._current = _Entry(plaintext_key, wrapped_key, self._clock(), messages=1, bytes_encrypted=size)

    def unwrapped(self, wrapped_key: bytes) -> bytes | None:
        with self._lock:
            found = self._unwrapped.get(wrapped_key)
            if found is None or self._clock() - found[0] >= self._max_age_s:
                self._unwrapped.pop(wrapped_key, None)
                return None
            return found[1]

    def remember_unwrapped(self, wrapped_key: bytes, plaintext_key: bytes) -> None:
        with self._lock:
            self._unwrapped[wrapped_key] = (self._clock(), plaintext_key)
            if len(self._unwrapped) > self._max_messages:
                oldest = min(self._unwrapped, key=lambda k: self._unwrapped[k][0])
                del self._unwrapped[oldest]
