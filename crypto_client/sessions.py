"""SessionKeys / AsyncSessionKeys: short-lived keys for calls and rooms in the realtime socket service.

See crypto_client/_async/sessions.py (the blocking SessionKeys is generated from it).
"""

from crypto_client._async.sessions import AsyncSessionKeys
from crypto_client._sync.sessions import SessionKeys, new_attempt_id

__all__ = ["AsyncSessionKeys", "SessionKeys", "new_attempt_id"]
