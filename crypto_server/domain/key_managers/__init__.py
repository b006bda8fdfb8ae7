"""The built-in key managers, one module per algorithm, and the registry the server uses.

Adding an algorithm: a module here that defines its KeyManager (see hmac_sha256.py for the smallest), and
one line in ALGORITHMS below. docs/development.md, "Adding an algorithm", has the rest (the proto enum value
that lets clients name it).
"""

from __future__ import annotations

from crypto_server.domain.algorithms import AlgorithmRegistry
from crypto_server.domain.key_managers import aes_256_gcm, ecdsa_p256_sha256, ed25519, hmac_sha256

ALGORITHMS = AlgorithmRegistry(
    (
        aes_256_gcm.MANAGER,
        hmac_sha256.MANAGER,
        ed25519.MANAGER,
        ecdsa_p256_sha256.MANAGER,
    )
)
