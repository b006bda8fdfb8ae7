"""Versions a key does not hold, read on their own (service/key_versions.py), and a pass that meets a key it
cannot handle (service/leased_passes.py)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crypto_server.domain.errors import KeyIntegrityError
from crypto_server.domain.keys import Key, KeyPolicy, KeyType, KeyVersion
from crypto_server.service.key_versions import vouched_versions, with_every_version, with_version
from crypto_server.service.leased_passes import LeasedPasses, PassSchedule
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock

NOW = datetime(2030, 1, 1, tzinfo=UTC)


def _version(number: int, **state: object) -> KeyVersion:
    return replace(KeyVersion(number, NOW, None, 1, os.urandom(60)), **state)


def _key(versions: tuple[KeyVersion, ...], primary: int) -> Key:
    return Key(
        key_id=str(uuid.uuid4()),
        tenant_id="t1",
        key_type=KeyType.DATA,
        disabled=False,
        primary_version=primary,
        versions=versions,
        created_at=NOW,
        policy=KeyPolicy(None, None),
        labels={},
        parent_key_id="parent",
    )


@dataclass
class _Reader:
    """A store as the service reads it: `key` as get_key holds it, `rows` as list_versions reads them; each
    get_key takes the next of `later_keys` if any (a change landing between two reads)."""

    key: Key
    rows: list[KeyVersion]
    later_keys: list[Key] = field(default_factory=list)
    key_reads: int = 0

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        self.key_reads += 1
        if self.later_keys:
            self.key = self.later_keys.pop(0)
        return self.key

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        return [v for v in self.rows if after_version < v.version <= self.key.primary_version][:limit]


def test_a_version_the_key_holds_is_taken_as_the_key_holds_it() -> None:
    disabled = _version(1, disabled=True)
    key = _key((disabled, _version(3)), primary=3)
    row_without_state = replace(disabled, disabled=False)  # a row edited back to enabled
    reader = _Reader(key, [row_without_state, _version(2), key.versions[1]])
    read_key, versions = vouched_versions(reader, key, lambda k: reader.list_versions("t1", k.key_id, 0, 10))
    assert read_key is key and [v.disabled for v in versions] == [True, False, False]


def test_a_state_the_key_does_not_list_reads_the_key_again_and_takes_the_newer_key() -> None:
    old = _key((_version(3),), primary=3)
    newer = replace(old, versions=(_version(2, disabled=True), _version(3)), revision=1)  # DisableKeyVersion meanwhile
    reader = _Reader(old, [_version(1), _version(2, disabled=True), _version(3)], later_keys=[newer])
    key = with_every_version(reader, old)
    assert key.revision == 1 and [v.disabled for v in key.versions] == [False, True, False]


def test_a_state_no_read_of_the_key_lists_is_an_integrity_failure() -> None:
    key = _key((_version(3),), primary=3)
    reader = _Reader(key, [_version(1), _version(2, destroy_at=NOW), _version(3)])
    with pytest.raises(KeyIntegrityError, match="does not list"):
        with_version(reader, key, 2)
    assert reader.key_reads == 2, "the key read again twice, then refused"


def test_a_version_missing_below_the_primary_is_an_integrity_failure() -> None:
    key = _key((_version(3),), primary=3)
    reader = _Reader(key, [_version(1), _version(3)])
    with pytest.raises(KeyIntegrityError, match="lost version 2"):
        with_version(reader, key, 2)
    with pytest.raises(KeyIntegrityError, match="lost versions"):
        with_every_version(_Reader(key, [_version(1), _version(3)]), key)


class _Passes(LeasedPasses, lease_name="test-passes", work="test work", default_batch=10):
    def __init__(self, store: SqliteKeyStore, due: list[tuple[str, str]]) -> None:
        super().__init__(store, FakeClock(NOW), PassSchedule(interval_s=0, lease_ttl_s=60), None)
        self.due = due
        self.handled: list[str] = []

    def _due(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self.due[:limit]

    def _handle(self, tenant_id: str, key_id: str) -> int:
        if key_id == "broken":
            raise AssertionError("a row no check foresaw")  # what a defect looks like from here
        self.handled.append(key_id)
        return 1


def test_a_key_failing_unexpectedly_does_not_stop_the_pass_for_the_keys_after_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = SqliteKeyStore(tmp_path)
    passes = _Passes(store, [("t1", "broken"), ("t1", "k2"), ("t1", "k3")])
    assert passes.run_once() == 2
    assert passes.handled == ["k2", "k3"]
    assert any("failed unexpectedly" in record.getMessage() for record in caplog.records)
    store.close()
