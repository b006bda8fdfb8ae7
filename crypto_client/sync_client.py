"""CryptoClient: the blocking client, over a grpc.Channel (generated from the asyncio client: see _async/client.py)."""

from crypto_client._sync.client import CryptoClient

__all__ = ["CryptoClient"]
