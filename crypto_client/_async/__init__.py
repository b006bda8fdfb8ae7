"""The asyncio sources: the one declaration of the client and its helpers. crypto_client/_sync is generated
from them by scripts/unasync.py (`make unasync`); edit here, never there."""
