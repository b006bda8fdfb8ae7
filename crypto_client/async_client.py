"""AsyncCryptoClient: the asyncio client, over a grpc.aio.Channel. Same methods as CryptoClient."""

from crypto_client._async.client import AsyncCryptoClient

__all__ = ["AsyncCryptoClient"]
