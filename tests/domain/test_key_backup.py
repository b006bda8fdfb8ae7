"""The backup format's metadata codec: every optional field present and absent survives a round trip."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.errors import BackupMalformed
from crypto_server.domain.key_backup import BackupMetadata, BackupVersion, decode_metadata, encode_metadata
from crypto_server.domain.keys import KeyPolicy, KeyType

NOW = datetime(2026, 1, 1, 12, 30, 45, 123000, tzinfo=UTC)


@pytest.mark.parametrize("present", [True, False])
def test_metadata_round_trips(present: bool) -> None:
    metadata = BackupMetadata(
        tenant_id="acme-é",
        key_id=str(uuid.uuid4()),
        parent_key_id=str(uuid.uuid4()) if present else None,
        key_type=KeyType.DATA,
        algorithm=Algorithm.ECDSA_P256_SHA256,
        disabled=present,
        created_at=NOW,
        policy=KeyPolicy(timedelta(days=400), timedelta(hours=1)) if present else KeyPolicy(None, None),
        labels=MappingProxyType({"b": "2", "a": "1"} if present else {}),
        primary_version=3,
        versions=(
            BackupVersion(
                1, NOW, NOW + timedelta(days=1) if present else None, 2**40, "req-1" if present else None, present
            ),
            BackupVersion(3, NOW + timedelta(days=2), None, 0, None),
        ),
        exported_at=NOW + timedelta(days=3),
        min_decryption_version=3 if present else 0,
    )
    assert decode_metadata(encode_metadata(metadata)) == metadata


def test_metadata_with_a_primary_that_is_not_a_version_is_malformed() -> None:
    metadata = BackupMetadata(
        "acme", str(uuid.uuid4()), None, KeyType.DATA, Algorithm.AES_256_GCM, False, NOW, KeyPolicy(None, None),
        MappingProxyType({}), 2, (BackupVersion(1, NOW, None, 0, None),), NOW,
    )  # fmt: skip
    with pytest.raises(BackupMalformed, match="primary version 2"):
        decode_metadata(encode_metadata(metadata))
