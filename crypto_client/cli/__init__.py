"""`cryptoctl`: the operator's command line for the crypto service (on top of crypto_client)."""
