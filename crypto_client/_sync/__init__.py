"""Generated from crypto_client/_async by scripts/unasync.py (make unasync): do not edit."""
