# Generated from crypto_client/_async/messaging.py by scripts/unasync.py (make unasync): do not edit.
"""MessageCipher: encrypt chat message content bound to where it belongs.

The associated data binds each ciphertext to (tenant, conversation id, message
id): a message's ciphertext copied into another conversation, onto another
message id or into another tenant fails to decrypt instead of showing the
wrong content. Layout of the aad (length-prefixed, so fields cannot shift):

    "caas.messaging.v1" 0x00 || u16 len || tenant_id || u16 len || conversation_id || u16 len || message_id
"""

from __future__ import annotations

from collections.abc import Sequence

from crypto_client._sync.client import CryptoClient
from crypto_client.errors import CryptoClientError
from crypto_client.models import DecryptItem, DecryptResult

_DOMAIN = b"caas.messaging.v1\x00"


def message_aad(tenant_id: str, conversation_id: str, message_id: str) -> bytes:
    parts = [_DOMAIN]
    for value in (tenant_id, conversation_id, message_id):
        encoded = value.encode()
        if not encoded or len(encoded) > 0xFFFF:
            raise ValueError("tenant, conversation and message ids must be 1 to 65535 bytes")
        parts += [len(encoded).to_bytes(2, "big"), encoded]
    return b"".join(parts)


def _plaintexts(results: Sequence[DecryptResult | CryptoClientError]) -> list[bytes | CryptoClientError]:
    return [r if isinstance(r, CryptoClientError) else r.plaintext for r in results]


class MessageCipher:
    """Message content encryption for the messaging service, for one tenant (`tenant_id`, default: the
    client's; the tenant is bound into every message's aad)."""

    def __init__(self, client: CryptoClient, key_id: str, *, tenant_id: str | None = None) -> None:
        tenant = tenant_id if tenant_id is not None else client.tenant_id
        if tenant is None:
            raise ValueError("MessageCipher needs tenant_id= when its client has no default tenant")
        self._client = client
        self._key_id = key_id
        self._tenant_id = tenant

    def encrypt(self, conversation_id: str, message_id: str, content: bytes) -> bytes:
        aad = message_aad(self._tenant_id, conversation_id, message_id)
        return (self._client.encrypt(self._key_id, content, aad=aad, tenant_id=self._tenant_id)).ciphertext

    def decrypt(self, conversation_id: str, message_id: str, ciphertext: bytes) -> bytes:
        aad = message_aad(self._tenant_id, conversation_id, message_id)
        return (self._client.decrypt(ciphertext, aad=aad, tenant_id=self._tenant_id)).plaintext

    def decrypt_history(
        self, conversation_id: str, messages: Sequence[tuple[str, bytes]]
    ) -> list[bytes | CryptoClientError]:
        """(message id, ciphertext) pairs of one conversation -> contents, in one call; a damaged
        message gives its own error instead of failing the page."""
        tenant = self._tenant_id
        items = [DecryptItem(ciphertext, message_aad(tenant, conversation_id, mid)) for mid, ciphertext in messages]
        return _plaintexts(self._client.batch_decrypt(items, tenant_id=tenant))
