"""AES-256-GCM: the default algorithm, and the only one every key type may use (a master key wraps the
tenant's other keys with it; a session key's material is handed to its caller as an AES-256-GCM key)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.algorithms import AEAD, STREAMING_AEAD, Algorithm, Builder, KeyManager, random_material
from crypto_server.domain.keys import KeyType
from crypto_server.domain.stream_format import StreamDecryptor, StreamEncryptor, StreamHeader


@dataclass(frozen=True, slots=True)
class SegmentedAesGcm:
    """The stream format of domain/stream_format.py: AES-256-GCM segments under a key derived per stream."""

    material: bytes = field(repr=False)

    def encryptor(self, tenant_id: str, key_id: uuid.UUID, key_version: int, aad: bytes) -> StreamEncryptor:
        return StreamEncryptor(self.material, tenant_id, key_id, key_version, aad)

    def decryptor(self, tenant_id: str, header: StreamHeader, aad: bytes) -> StreamDecryptor:
        return StreamDecryptor(self.material, tenant_id, header, aad)


MANAGER = KeyManager(
    algorithm=Algorithm.AES_256_GCM,
    key_types=frozenset({KeyType.MASTER, KeyType.DATA, KeyType.SESSION}),
    new_material=random_material,
    builders=(Builder(AEAD, AESGCM), Builder(STREAMING_AEAD, SegmentedAesGcm)),
)
