"""MessageCipher / AsyncMessageCipher: encrypt chat message content bound to where it belongs.

See crypto_client/_async/messaging.py (the blocking MessageCipher is generated from it).
"""

from crypto_client._async.messaging import AsyncMessageCipher
from crypto_client._sync.messaging import MessageCipher, message_aad

__all__ = ["AsyncMessageCipher", "MessageCipher", "message_aad"]
