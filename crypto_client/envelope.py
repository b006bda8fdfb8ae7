"""EnvelopeCipher / AsyncEnvelopeCipher: local AES-256-GCM under service-wrapped data keys, with an optional
data-key cache. See crypto_client/_async/envelope.py (the blocking EnvelopeCipher is generated from it)."""

from crypto_client._async.envelope import AsyncEnvelopeCipher
from crypto_client._data_key_cache import DataKeyCache, NullDataKeyCache
from crypto_client._sync.envelope import EnvelopeCipher

__all__ = ["AsyncEnvelopeCipher", "DataKeyCache", "EnvelopeCipher", "NullDataKeyCache"]
