"""BlindIndex: deterministic search tokens for encrypted fields (exact match).

The search service cannot index ciphertexts (every encryption is different).
It indexes a token instead: HMAC-SHA256 of the normalised term under the
tenant's MAC key, truncated to `token_bytes`. The same term gives the same
token for the same tenant and key; another tenant's key gives another token;
without the key, tokens reveal nothing but equality.

Rotation: new documents are indexed under the key's primary version. A query
computes the term's token under every unexpired version of the key and searches
for any of them, so documents indexed before a rotation are still found. An
expired version computes no more MACs (the service refuses, as it refuses to
encrypt with it), so documents must be re-indexed under a newer version before
their version expires: a background job the search service runs after each
rotation (versions live 365 days by default).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable

from crypto_client._async.client import AsyncCryptoClient
from crypto_client.errors import KeyExpiredError
from crypto_client.models import KeyVersionState

_DOMAIN = b"caas.search.v1\x00"


def normalise(term: str) -> str:
    """NFKC, case-folded, surrounding white space removed: full-width, upper-case and padded forms index alike."""
    return unicodedata.normalize("NFKC", term).casefold().strip()


class AsyncBlindIndex:
    def __init__(
        self,
        client: AsyncCryptoClient,
        key_id: str,
        *,
        field: str = "",
        token_bytes: int = 16,
        normalize: Callable[[str], str] = normalise,
        tenant_id: str | None = None,
    ) -> None:
        """`key_id` names an HMAC_SHA256 key (of `tenant_id`, default: the client's); `field` separates
        fields, so equal values in two fields give different tokens; `token_bytes` (8-32) trades index size
        against false matches."""
        if not 8 <= token_bytes <= 32:
            raise ValueError("token_bytes must be between 8 and 32")
        self._client = client
        self._key_id = key_id
        self._field = field.encode()
        self._token_bytes = token_bytes
        self._normalize = normalize
        self._tenant_id = tenant_id

    def _data(self, term: str) -> bytes:
        return _DOMAIN + len(self._field).to_bytes(2, "big") + self._field + self._normalize(term).encode()

    async def token(self, term: str) -> str:
        """The token to index a document under (the key's primary version), as hex."""
        mac = (await self._client.compute_mac(self._key_id, self._data(term), tenant_id=self._tenant_id)).mac
        return mac[: self._token_bytes].hex()

    async def query_tokens(self, term: str) -> list[str]:
        """Every token the term may have been indexed under (one per unexpired key version, newest first)."""
        listed = self._client.iter_key_versions(self._key_id, page_size=1000, tenant_id=self._tenant_id)
        versions = sorted([v.version async for v in listed if v.state is not KeyVersionState.EXPIRED], reverse=True)
        data = self._data(term)
        tokens = []
        for version in versions:
            try:
                computed = await self._client.compute_mac(
                    self._key_id, data, key_version=version, tenant_id=self._tenant_id
                )
            except KeyExpiredError:
                continue  # expired since the key's metadata was cached
            tokens.append(computed.mac[: self._token_bytes].hex())
        return tokens
