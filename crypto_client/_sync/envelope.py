# Generated from crypto_client/_async/envelope.py by scripts/unasync.py (make unasync): do not edit.
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

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_client._data_key_cache import DataKeyCache, NullDataKeyCache
from crypto_client._sync.client import CryptoClient
from crypto_client.errors import DecryptionError

_FORMAT = 1
_WRAP_AAD = b"caas.envelope.v1"


class EnvelopeCipher:
    """Envelopes under data keys wrapped by one key of one tenant (`tenant_id`, default: the client's)."""

    def __init__(
        self,
        client: CryptoClient,
        key_id: str,
        *,
        cache: DataKeyCache | NullDataKeyCache | None = None,
        tenant_id: str | None = None,
    ) -> None:
        self._client = client
        self._key_id = key_id
        self._cache = cache or NullDataKeyCache()
        self._tenant_id = tenant_id

    def encrypt(self, plaintext: bytes, *, aad: bytes = b"") -> bytes:
        reused = self._cache.take(len(plaintext))
        if reused is None:
            data_key = self._client.generate_data_key(self._key_id, aad=_WRAP_AAD, tenant_id=self._tenant_id)
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
            unwrapped = self._client.decrypt(wrapped_key, aad=_WRAP_AAD, tenant_id=self._tenant_id)
            plaintext_key = unwrapped.plaintext
            self._cache.remember_unwrapped(wrapped_key, plaintext_key)
        try:
            return AESGCM(plaintext_key).decrypt(body[:12], body[12:], aad)
        except InvalidTag:
            raise DecryptionError("ciphertext could not be decrypted") from None
