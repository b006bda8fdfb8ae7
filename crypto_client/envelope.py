"""Envelope encryption with an optional data-key cache, in the manner of the AWS Encryption SDK's
caching materials manager.

Each message is encrypted locally with AES-256-GCM under a data key from
GenerateDataKey; the data key travels with the message wrapped under a
service key, and Decrypt unwraps it. Without a cache that is one service call
per message. `DataKeyCache` lets one data key serve several messages within
limits — age, messages, bytes — trading a little exposure per data key for
far fewer calls. Off by default (`NullDataKeyCache`).

Envelope layout: 0x01 || u16 len(wrapped key) || wrapped key || nonce (12) || AES-GCM ciphertext || tag.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_client.errors import DecryptionError
from crypto_client.sync_client import CryptoClient

_FORMAT = 1
_WRAP_AAD = b"caas.envelope.v1"


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


class EnvelopeCipher:
    def __init__(
        self, client: CryptoClient, key_id: str, *, cache: DataKeyCache | NullDataKeyCache | None = None
    ) -> None:
        self._client = client
        self._key_id = key_id
        self._cache = cache or NullDataKeyCache()

    def encrypt(self, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        reused = self._cache.take(len(plaintext))
        if reused is None:
            data_key = self._client.generate_data_key(self._key_id, aad=_WRAP_AAD)
            assert data_key.plaintext is not None
            plaintext_key, wrapped_key = data_key.plaintext, data_key.ciphertext
            self._cache.put(plaintext_key, wrapped_key, len(plaintext))
        else:
            plaintext_key, wrapped_key = reused
        nonce = os.urandom(12)
        sealed = AESGCM(plaintext_key).encrypt(nonce, plaintext, aad)
        return bytes([_FORMAT]) + struct.pack(">H", len(wrapped_key)) + wrapped_key + nonce + sealed

    def decrypt(self, envelope: bytes, *, aad: bytes = b"") -> bytes:
        if len(envelope) < 3 or envelope[0] != _FORMAT:
            raise DecryptionError("ciphertext could not be decrypted")
        (wrapped_length,) = struct.unpack_from(">H", envelope, 1)
        wrapped_key = envelope[3 : 3 + wrapped_length]
        body = envelope[3 + wrapped_length :]
        if len(wrapped_key) != wrapped_length or len(body) < 12 + 16:
            raise DecryptionError("ciphertext could not be decrypted")
        plaintext_key = self._cache.unwrapped(wrapped_key)
        if plaintext_key is None:
            plaintext_key = self._client.decrypt(wrapped_key, aad=_WRAP_AAD).plaintext
            self._cache.remember_unwrapped(wrapped_key, plaintext_key)
        try:
            return AESGCM(plaintext_key).decrypt(body[:12], body[12:], aad)
        except InvalidTag:
            raise DecryptionError("ciphertext could not be decrypted") from None
