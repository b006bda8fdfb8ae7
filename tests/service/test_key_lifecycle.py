"""Key lifecycle use cases against the embedded store in a temporary directory, without gRPC: idempotent
creation, and rotation's compare-and-set retries (the gRPC suite shows the mapping; this, the logic)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.errors import ConcurrentModification, InvalidArgument, KeyDisabled
from crypto_server.domain.keys import Key, KeyState, KeyType, KeyVersion
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.keyring import Keyring
from crypto_server.storage.port import LocalInvalidation
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock

HOUR = timedelta(hours=1)


class _ScriptedStore(SqliteKeyStore):
    """The embedded store, with another writer that acts just before this one's next write (a race, on cue)."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self.rivals_before_add_version = 0
        self.rival_before_insert = False

    def insert_key(self, key: Key) -> None:
        if self.rival_before_insert:
            self.rival_before_insert = False
            super().insert_key(key)  # the same request, retried, got there first
        super().insert_key(key)

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        if self.rivals_before_add_version:
            self.rivals_before_add_version -= 1
            current = self.get_key(updated.tenant_id, updated.key_id)
            assert current is not None
            rival = KeyVersion(
                version=current.latest_version + 1,
                created_at=current.created_at,
                expires_at=None,
                parent_version=1,
                wrapped_material=os.urandom(60),
            )
            assert super().add_version(current.with_new_primary(rival), current.revision)
        return super().add_version(updated, expected_revision)


@dataclass
class _RecordedSchedule:
    rescheduled: list[tuple[str, str, int, datetime | None]] = field(default_factory=list)

    def keys_due_for_rotation(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return []

    def reschedule_rotation(
        self, tenant_id: str, key_id: str, expected_revision: int, next_rotation_at: datetime | None
    ) -> None:
        self.rescheduled.append((tenant_id, key_id, expected_revision, next_rotation_at))


@dataclass
class _Setup:
    store: _ScriptedStore
    lifecycle: KeyLifecycle
    clock: FakeClock
    schedule: _RecordedSchedule


@pytest.fixture
def setup(tmp_path: Path) -> _Setup:
    store = _ScriptedStore(tmp_path)
    keyring = Keyring(store, AESGCM(os.urandom(32)), ttl_s=300, max_keys=100)
    clock = FakeClock()
    schedule = _RecordedSchedule()
    lifecycle = KeyLifecycle(
        store, keyring, clock, LocalInvalidation(keyring), schedule=schedule, request_key_id_secret=b"s" * 32
    )
    return _Setup(store, lifecycle, clock, schedule)


def _data_keys(setup: _Setup) -> list[Key]:
    return setup.lifecycle.list_keys("t1", key_type=KeyType.DATA).keys


def test_a_repeated_create_key_returns_the_first_key_and_creates_nothing(setup: _Setup) -> None:
    first = setup.lifecycle.create_key("t1", KeyType.DATA, labels={"team": "a"}, request_id="create-1")
    setup.clock.advance(HOUR)
    again = setup.lifecycle.create_key("t1", KeyType.DATA, labels={"team": "a"}, request_id="create-1")
    assert again == first
    assert [key.key_id for key in _data_keys(setup)] == [first.key_id]
    other_tenant = setup.lifecycle.create_key("t2", KeyType.DATA, labels={"team": "a"}, request_id="create-1")
    assert other_tenant.key_id != first.key_id, "a request id names a key within its tenant only"


def test_a_request_id_reused_with_other_parameters_is_refused(setup: _Setup) -> None:
    setup.lifecycle.create_key("t1", KeyType.DATA, labels={"team": "a"}, request_id="create-1")
    with pytest.raises(InvalidArgument, match="request_id"):
        setup.lifecycle.create_key("t1", KeyType.DATA, labels={"team": "b"}, request_id="create-1")
    assert len(_data_keys(setup)) == 1


def test_a_create_racing_with_its_own_retry_returns_the_key_the_retry_made(setup: _Setup) -> None:
    setup.lifecycle.create_key("t1", KeyType.MASTER)
    setup.store.rival_before_insert = True
    key = setup.lifecycle.create_key("t1", KeyType.DATA, request_id="create-1")
    assert [stored.key_id for stored in _data_keys(setup)] == [key.key_id]


def test_a_create_without_request_id_whose_id_collides_is_a_concurrent_modification(setup: _Setup) -> None:
    setup.lifecycle.create_key("t1", KeyType.MASTER)
    setup.store.rival_before_insert = True
    with pytest.raises(ConcurrentModification):
        setup.lifecycle.create_key("t1", KeyType.DATA)


def test_a_rotation_that_loses_the_race_reloads_and_adds_the_next_version(setup: _Setup) -> None:
    key = setup.lifecycle.create_key("t1", KeyType.DATA)
    setup.store.rivals_before_add_version = 2
    rotated = setup.lifecycle.rotate_key("t1", key.key_id)
    assert rotated.primary_version == 4, "versions 2 and 3 were the rivals'"
    stored = setup.lifecycle.get_key("t1", key.key_id)
    assert [version.version for version in setup.store.list_versions("t1", key.key_id, 0, 100)] == [1, 2, 3, 4]
    assert stored.primary.wrapped_material == rotated.primary.wrapped_material


def test_a_rotation_that_always_loses_gives_up(setup: _Setup) -> None:
    key = setup.lifecycle.create_key("t1", KeyType.DATA)
    setup.store.rivals_before_add_version = 1000
    with pytest.raises(ConcurrentModification):
        setup.lifecycle.rotate_key("t1", key.key_id)


def test_a_repeated_rotation_request_adds_one_version(setup: _Setup) -> None:
    key = setup.lifecycle.create_key("t1", KeyType.DATA)
    first = setup.lifecycle.rotate_key("t1", key.key_id, request_id="rotate-1")
    again = setup.lifecycle.rotate_key("t1", key.key_id, request_id="rotate-1")
    assert first.primary_version == again.primary_version == 2
    assert len(setup.store.list_versions("t1", key.key_id, 0, 100)) == 2


def test_a_disabled_key_is_not_rotated(setup: _Setup) -> None:
    key = setup.lifecycle.create_key("t1", KeyType.DATA)
    setup.lifecycle.disable_key("t1", key.key_id)
    with pytest.raises(KeyDisabled):
        setup.lifecycle.rotate_key("t1", key.key_id)
    assert setup.lifecycle.get_key("t1", key.key_id).state_at(setup.clock.now()) is KeyState.DISABLED


def test_a_key_not_yet_due_is_rescheduled_from_its_metadata_not_rotated(setup: _Setup) -> None:
    key = setup.lifecycle.create_key("t1", KeyType.DATA, rotation_period=2 * HOUR)
    assert setup.lifecycle.automatic_rotation_request("t1", key.key_id) is None
    assert setup.schedule.rescheduled == [("t1", key.key_id, key.revision, key.next_rotation_at)]
    setup.clock.advance(2 * HOUR)
    assert setup.lifecycle.automatic_rotation_request("t1", key.key_id) == "auto-rotation.2"
    assert len(setup.schedule.rescheduled) == 1
