"""The version-state rules (domain/key_destruction.py) and their place in the integrity tag."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from types import MappingProxyType

import pytest

from crypto_server.domain.errors import KeyVersionDestroyed, KeyVersionDisabled, KeyVersionStateConflict
from crypto_server.domain.key_destruction import (
    check_can_decrypt,
    due_versions,
    with_destruction_cancelled,
    with_key_destruction_scheduled,
    with_version_destruction_scheduled,
    with_version_disabled,
    with_versions_destroyed,
)
from crypto_server.domain.key_integrity import MetadataAuthenticator, canonical_metadata
from crypto_server.domain.keys import Key, KeyPolicy, KeyType, KeyVersion, KeyVersionState

NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATER = NOW + timedelta(days=7)


def _key(versions: int = 2) -> Key:
    return Key(
        key_id="6f1c0e52-8c1e-4d8e-9a55-6a1f3f0a8c01",
        tenant_id="acme",
        key_type=KeyType.DATA,
        disabled=False,
        primary_version=versions,
        versions=tuple(
            KeyVersion(version=n, created_at=NOW, expires_at=None, parent_version=1, wrapped_material=os.urandom(60))
            for n in range(1, versions + 1)
        ),
        created_at=NOW,
        policy=KeyPolicy(None, None),
        labels=MappingProxyType({}),
        parent_key_id="0b7e1f4c-2a43-4a55-8f0e-1c9b5a7d2e10",
    )


def test_a_key_without_version_states_has_the_canonical_form_it_had_before_they_existed() -> None:
    document = json.loads(canonical_metadata(_key()))
    assert "min_decryption_version" not in document
    assert all(
        set(v) == {"version", "created_at", "expires_at", "parent_version", "request_id"} for v in document["versions"]
    )


@pytest.mark.parametrize(
    "change",
    [
        lambda k: with_version_disabled(k, 1, True),
        lambda k: with_version_destruction_scheduled(k, 1, LATER),
        lambda k: with_versions_destroyed(k, [1], NOW),
        lambda k: replace(k, min_decryption_version=2),
    ],
)
def test_every_version_state_changes_the_tag(change: object) -> None:
    authenticator = MetadataAuthenticator(os.urandom(32))
    key = _key()
    changed = change(key)  # type: ignore[operator]
    assert authenticator.tag(changed) != authenticator.tag(key)
    # Written back to the default (the attack: re-enable by removing the field), the old tag no longer matches.
    assert not authenticator.verify(replace(key, integrity_tag=authenticator.tag(changed)))


def test_destruction_erases_material_and_keeps_metadata_and_cancel_restores_the_state_before() -> None:
    key = with_version_disabled(_key(), 1, True)
    scheduled = with_version_destruction_scheduled(key, 1, LATER)
    assert scheduled.versions[0].state_at(NOW) is KeyVersionState.DESTROY_SCHEDULED
    assert due_versions(scheduled, NOW) == [] and due_versions(scheduled, LATER) == [1]
    assert with_destruction_cancelled(scheduled, 1).versions[0].state_at(NOW) is KeyVersionState.DISABLED

    destroyed = with_versions_destroyed(scheduled, due_versions(scheduled, LATER), LATER)
    first = destroyed.versions[0]
    assert first.wrapped_material == b"" and first.destroyed_at == LATER
    assert first.state_at(LATER) is KeyVersionState.DESTROYED
    assert destroyed.versions[1] == key.versions[1]
    with pytest.raises(KeyVersionDestroyed):
        check_can_decrypt(destroyed, first)
    with pytest.raises(KeyVersionStateConflict):
        with_destruction_cancelled(destroyed, 1)


def test_the_primary_is_neither_disabled_nor_destroyed_alone_but_goes_with_the_whole_key() -> None:
    key = _key()
    with pytest.raises(KeyVersionStateConflict):
        with_version_disabled(key, 2, True)
    with pytest.raises(KeyVersionStateConflict):
        with_version_destruction_scheduled(key, 2, LATER)
    whole = with_key_destruction_scheduled(key, LATER)
    assert [v.destroy_at for v in whole.versions] == [LATER, LATER]
    assert whole.next_rotation_at is None
    with pytest.raises(KeyVersionDisabled):
        check_can_decrypt(whole, whole.versions[1])
