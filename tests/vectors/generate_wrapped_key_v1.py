"""Write wrapped_key_v1.json from the page (docs/ciphertext-format.md, "Wrapped keys"), not from the service's code.

Run from the repository root: `.venv/bin/python -m tests.vectors.generate_wrapped_key_v1`. The nonces are fixed
here (the service draws them at random) so the output is a known answer; the tests recompute every wrapped
value from its inputs, so an edited or regenerated file must still agree with this code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from tests.offline_recovery import Binding, hmac_sha256, make_root_key_check, signing_key, wrap

OUTPUT = Path(__file__).parent / "wrapped_key_v1.json"
TENANT_ID = "acme.corp"
MASTER_KEY_ID = "0f8e7d6c-5b4a-4392-8170-6f5e4d3c2b1a"
MASTER_VERSION = 2
ROOT_KEY = bytes(range(32))
ROOT_KEY_CHECK_NONCE = bytes([0xC0]) * 12
MAC_MESSAGE = b"caas"


def _entry(name: str, parent_key: bytes, binding: Binding, material: bytes, nonce: bytes) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "name": name,
        "tenant_id": binding.tenant_id,
        "key_id": binding.key_id,
        "key_type": binding.key_type,
        "algorithm": binding.algorithm,
        "version": binding.version,
        "parent_version": binding.parent_version,
        "material": material.hex(),
        "nonce": nonce.hex(),
        "associated_data": binding.associated_data().hex(),
        "wrapped": wrap(parent_key, material, binding, nonce).hex(),
    }
    if binding.algorithm == "HMAC_SHA256":
        entry["mac_message"] = MAC_MESSAGE.hex()
        entry["mac"] = hmac_sha256(material, MAC_MESSAGE).hex()
    elif binding.algorithm in ("ED25519", "ECDSA_P256_SHA256"):
        public_key = signing_key(binding.algorithm, material).public_key()
        entry["public_key_pem"] = public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ).decode()
    return entry


def vectors() -> dict[str, Any]:
    master_material = bytes([0x4D]) * 32
    master_binding = Binding(TENANT_ID, MASTER_KEY_ID, "MASTER", "AES_256_GCM", MASTER_VERSION, 0)
    master = _entry(
        "master key version 2 under the root key", ROOT_KEY, master_binding, master_material, bytes([0xA0]) * 12
    )
    under_master = [
        ("data key, AES-256-GCM", "5a6b7c8d-9e0f-4a1b-8c2d-3e4f5a6b7c8d", "DATA", "AES_256_GCM", 1, 0x41),
        ("data key, HMAC-SHA256, highest version", "6b7c8d9e-0f1a-4b2c-9d3e-4f5a6b7c8d9e", "DATA", "HMAC_SHA256",
         4294967295, 0x48),
        ("data key, Ed25519", "7c8d9e0f-1a2b-4c3d-8e4f-5a6b7c8d9e0f", "DATA", "ED25519", 3, 0x45),
        ("data key, ECDSA P-256", "8d9e0f1a-2b3c-4d4e-9f5a-6b7c8d9e0f1a", "DATA", "ECDSA_P256_SHA256", 1, 0x50),
        ("session key", "9e0f1a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b", "SESSION", "AES_256_GCM", 1, 0x53),
    ]  # fmt: skip
    wrapped_under_master = [
        _entry(
            name,
            master_material,
            Binding(TENANT_ID, key_id, key_type, algorithm, version, MASTER_VERSION),
            bytes([fill]) * 32,
            bytes([0xA1 + n]) * 12,
        )
        for n, (name, key_id, key_type, algorithm, version, fill) in enumerate(under_master)
    ]
    return {
        "root_key": ROOT_KEY.hex(),
        "root_key_check": make_root_key_check(ROOT_KEY, ROOT_KEY_CHECK_NONCE).hex(),
        "master_key": master,
        "wrapped_under_master": wrapped_under_master,
    }


if __name__ == "__main__":
    OUTPUT.write_text(json.dumps(vectors(), indent=2) + "\n")
