"""Limits of the API contract that are not settings: the same for every deployment."""

from __future__ import annotations

# Associated data is context (ids, headers), never a payload: 64 KiB bounds what a request may carry as aad.
MAX_AAD_BYTES = 64 * 1024

# NIST SP 800-38D: with random 96-bit IVs, at most 2^32 invocations of the encryption per key.
GCM_RANDOM_NONCE_LIMIT = 2**32
