"""TokenSigner / AsyncTokenSigner: JWTs (EdDSA with Ed25519 keys, ES256 with ECDSA P-256 keys) signed by the
service and verified locally. See crypto_client/_async/tokens.py (the blocking TokenSigner is generated from it).
"""

from crypto_client._async.tokens import AsyncTokenSigner
from crypto_client._jwt import MAX_TOKEN_CHARS, InvalidTokenError
from crypto_client._sync.tokens import TokenSigner

__all__ = ["MAX_TOKEN_CHARS", "AsyncTokenSigner", "InvalidTokenError", "TokenSigner"]
