"""BlindIndex / AsyncBlindIndex: deterministic search tokens for encrypted fields (exact match).

See crypto_client/_async/search.py (the blocking BlindIndex is generated from it).
"""

from crypto_client._async.search import AsyncBlindIndex
from crypto_client._sync.search import BlindIndex, normalise

__all__ = ["AsyncBlindIndex", "BlindIndex", "normalise"]
