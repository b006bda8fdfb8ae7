"""HMAC-SHA256 over 32 random bytes."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field

from crypto_server.domain.algorithms import MAC, Algorithm, Builder, KeyManager, random_material
from crypto_server.domain.keys import KeyType


@dataclass(frozen=True, slots=True)
class HmacSha256:
    material: bytes = field(repr=False)

    def compute(self, data: bytes) -> bytes:
        return hmac.new(self.material, data, hashlib.sha256).digest()

    def verify(self, data: bytes, mac: bytes) -> bool:
        # Constant time, so timing reveals nothing about how much of a forged MAC was right.
        return hmac.compare_digest(self.compute(data), mac)


MANAGER = KeyManager(
    algorithm=Algorithm.HMAC_SHA256,
    key_types=frozenset({KeyType.DATA}),
    new_material=random_material,
    builders=(Builder(MAC, HmacSha256),),
)
