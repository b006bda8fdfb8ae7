"""A Key as the JSON a Redis cache entry holds: wrapped material (base64) and metadata, never plaintext."""

from __future__ import annotations

import base64
import json
from datetime import datetime, timedelta

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.keys import Key, KeyPolicy, KeyType, KeyVersion


def encode_key(key: Key) -> str:
    def moment(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    def millis(value: timedelta | None) -> int | None:
        return None if value is None else value // timedelta(milliseconds=1)

    return json.dumps(
        {
            "key_id": key.key_id,
            "tenant_id": key.tenant_id,
            "key_type": key.key_type.value,
            "disabled": key.disabled,
            "primary_version": key.primary_version,
            "created_at": moment(key.created_at),
            "expire_after_ms": millis(key.policy.expire_after),
            "rotation_period_ms": millis(key.policy.rotation_period),
            "labels": dict(key.labels),
            "parent_key_id": key.parent_key_id,
            "revision": key.revision,
            "algorithm": key.algorithm.value,
            "integrity_tag": base64.b64encode(key.integrity_tag).decode(),
            "versions": [
                {
                    "version": v.version,
                    "created_at": moment(v.created_at),
                    "expires_at": moment(v.expires_at),
                    "parent_version": v.parent_version,
                    "wrapped_material": base64.b64encode(v.wrapped_material).decode(),
                    "request_id": v.request_id,
                    "encryptions": v.encryptions,
                    "disabled": v.disabled,
                    "destroy_at": moment(v.destroy_at),
                    "destroyed_at": moment(v.destroyed_at),
                    "integrity_tag": base64.b64encode(v.integrity_tag).decode(),
                }
                for v in key.versions
            ],
            "min_decryption_version": key.min_decryption_version,
        },
        separators=(",", ":"),
    )


def decode_key(text: bytes) -> Key:
    data = json.loads(text)

    def moment(value: str | None) -> datetime | None:
        return None if value is None else datetime.fromisoformat(value)

    def millis(value: int | None) -> timedelta | None:
        return None if value is None else timedelta(milliseconds=value)

    return Key(
        key_id=data["key_id"],
        tenant_id=data["tenant_id"],
        key_type=KeyType(data["key_type"]),
        disabled=data["disabled"],
        primary_version=data["primary_version"],
        versions=tuple(
            KeyVersion(
                version=v["version"],
                created_at=datetime.fromisoformat(v["created_at"]),
                expires_at=moment(v["expires_at"]),
                parent_version=v["parent_version"],
                wrapped_material=base64.b64decode(v["wrapped_material"]),
                request_id=v.get("request_id"),
                encryptions=v.get("encryptions", 0),
                disabled=v.get("disabled", False),
                destroy_at=moment(v.get("destroy_at")),
                destroyed_at=moment(v.get("destroyed_at")),
                integrity_tag=base64.b64decode(v.get("integrity_tag", "")),
            )
            for v in data["versions"]
        ),
        created_at=datetime.fromisoformat(data["created_at"]),
        policy=KeyPolicy(millis(data["expire_after_ms"]), millis(data["rotation_period_ms"])),
        labels=data["labels"],
        parent_key_id=data["parent_key_id"],
        revision=data["revision"],
        algorithm=Algorithm(data.get("algorithm", Algorithm.AES_256_GCM.value)),
        integrity_tag=base64.b64decode(data.get("integrity_tag", "")),
        min_decryption_version=data.get("min_decryption_version", 0),
    )
