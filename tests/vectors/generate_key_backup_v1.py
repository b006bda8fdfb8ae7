"""Generates tests/vectors/key_backup_v1.json with the code of backup format version 1, frozen since: run it
from a checkout of a commit before format version 2 (e.g. 54e0e70), `PYTHONPATH=<checkout> python
tests/vectors/generate_key_backup_v1.py > tests/vectors/key_backup_v1.json`."""

import base64
import json
import uuid
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain import key_backup as kb
from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.ciphertext import encrypt
from crypto_server.domain.keys import KeyPolicy, KeyType

assert kb.FORMAT_VERSION == 1
private = x25519.X25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
created = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
key_id = "6f1c2b7e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"
materials = (bytes(range(32)), bytes(range(32, 64)))
meta = kb.BackupMetadata(
    tenant_id="acme",
    key_id=key_id,
    parent_key_id="0d9c8b7a-6f5e-4d3c-8b2a-19f8e7d6c5b4",
    key_type=KeyType.DATA,
    algorithm=Algorithm.AES_256_GCM,
    disabled=False,
    created_at=created,
    policy=KeyPolicy(timedelta(days=365), timedelta(days=90)),
    labels=MappingProxyType({"team": "payments"}),
    primary_version=2,
    versions=(
        kb.BackupVersion(1, created, created + timedelta(days=365), 7, "rotate-1"),
        kb.BackupVersion(2, created + timedelta(days=1), created + timedelta(days=366), 3, None),
    ),
    exported_at=created + timedelta(days=2),
)
blob = kb.seal_for_public_key(kb.KeyBackup(meta, materials), private.public_key())
ct = encrypt(AESGCM(materials[0]), "acme", uuid.UUID(key_id), 1, b"sealed before the backup", b"")
pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
print(
    json.dumps(
        {
            "comment": "A key backup of format version 1, made by the code of that version for a test X25519 key "
            "(never a real one); ciphertext: version 1 of the key sealed 'sealed before the backup'.",
            "backup_private_key_pem": pem.decode(),
            "backup": base64.b64encode(blob).decode(),
            "tenant_id": "acme",
            "key_id": key_id,
            "versions": [1, 2],
            "primary_version": 2,
            "ciphertext": base64.b64encode(ct).decode(),
            "plaintext": "sealed before the backup",
            "materials_hex": [m.hex() for m in materials],
        },
        indent=2,
    )
)
