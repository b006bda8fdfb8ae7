"""The storage contract of KeyReader.list_versions (storage/port.py), on every store: SQLite, MongoDB, and MongoDB
behind the Redis cache, through the fixtures of test_contract.py.

A page of versions must be exactly what get_key holds for those numbers (states, encryptions, material), bounded
by the key's primary, and nothing for another tenant. On MongoDB a key's versions live in two places (the first
ones embedded in the key document, rotations in `key_versions`), so the keys here have both.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace

import pytest

from crypto_server.domain.keys import Key, KeyVersion
from crypto_server.storage.mongo import MongoKeyStore
from crypto_server.storage.port import VersionRef
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.servers import MongoServer
from tests.storage.test_contract import HOUR, NOW, Stores, _key, _stored, _version
from tests.storage.test_contract import stores as stores  # the fixture: every store of the contract

EMBEDDED = 3  # versions inside the key document on MongoDB, as an imported key has them


def _key_with_versions(stores: Stores, count: int, tenant_id: str = "t1") -> Key:
    """A key of `count` versions: the first EMBEDDED written with the key, the rest by rotations."""
    first = _key(tenant_id)
    versions = tuple(_version(number, created_at=NOW + number * HOUR) for number in range(1, EMBEDDED + 1))
    key = replace(first, versions=versions, primary_version=EMBEDDED)
    stores.serving.insert_key(key)
    for number in range(EMBEDDED + 1, count + 1):
        current = _stored(stores, key)
        assert stores.serving.add_version(
            current.with_new_primary(_version(number, created_at=NOW + number * HOUR)), current.revision
        )
    return _stored(stores, key)


def _all_pages(stores: Stores, key: Key, limit: int) -> list[list[KeyVersion]]:
    pages: list[list[KeyVersion]] = []
    after = 0
    while True:
        page = stores.serving.list_versions(key.tenant_id, key.key_id, after, limit)
        assert len(page) <= limit
        if not page:
            return pages
        pages.append(page)
        after = page[-1].version


def test_pages_hold_every_version_once_in_order_as_get_key_holds_them(stores: Stores) -> None:
    key = _key_with_versions(stores, 12)
    pages = _all_pages(stores, key, limit=5)
    assert [[v.version for v in page] for page in pages] == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10], [11, 12]]
    listed = {v.version: v for page in pages for v in page}
    assert key.versions and all(listed[v.version] == v for v in key.versions), "a version read as get_key holds it"


def test_the_range_is_bounded_by_after_version_the_limit_and_the_primary(stores: Stores) -> None:
    key = _key_with_versions(stores, 6)

    def numbers(after: int, limit: int) -> list[int]:
        return [v.version for v in stores.serving.list_versions("t1", key.key_id, after, limit)]

    assert numbers(0, 1) == [1]
    assert numbers(2, 2) == [3, 4], "an embedded version and a rotated one in one page"
    assert numbers(4, 100) == [5, 6]
    assert numbers(5, 100) == [6]
    assert numbers(6, 100) == []
    assert numbers(1000, 10) == []


def test_a_pending_version_above_the_primary_is_not_listed(stores: Stores, request: pytest.FixtureRequest) -> None:
    key = _key_with_versions(stores, 4)
    pending = _version(5)
    # A rotation that stopped between its two writes (MongoDB); written behind the store's back on SQLite,
    # whose rotations are one transaction, to show that the primary bounds the answer there too.
    if isinstance(stores.store, SqliteKeyStore):
        with sqlite3.connect(stores.store.path) as db:
            db.execute(
                "INSERT INTO key_versions (key_id, version, created_us, parent_version, wrapped_material) "
                "VALUES (?, 5, 0, 1, ?)",
                (key.key_id, pending.wrapped_material),
            )
        db.close()
    else:
        assert isinstance(stores.store, MongoKeyStore)
        mongo: MongoServer = request.getfixturevalue("mongo_server")
        with mongo.client() as client:
            client[stores.store.database]["key_versions"].insert_one(
                MongoKeyStore._version_document(key.key_id, pending)
            )
    assert [v.version for v in stores.serving.list_versions("t1", key.key_id, 0, 100)] == [1, 2, 3, 4]
    assert stores.serving.list_versions("t1", key.key_id, 4, 100) == []


def test_another_tenant_and_an_unknown_key_get_nothing(stores: Stores) -> None:
    key = _key_with_versions(stores, 4)
    assert stores.serving.list_versions("t2", key.key_id, 0, 100) == []
    other = _key_with_versions(stores, 2, tenant_id="t2")
    assert stores.serving.list_versions("t1", other.key_id, 0, 100) == []
    assert stores.serving.list_versions("t1", _key().key_id, 0, 100) == []


def test_states_and_encryptions_come_back_and_destroyed_material_is_empty(stores: Stores) -> None:
    key = _key_with_versions(stores, 7)
    key = key.with_versions(stores.serving.list_versions("t1", key.key_id, 0, 10))
    v1, v2, v3, v4, v5, v6, v7 = key.versions
    versions = (
        replace(v1, destroy_at=NOW, destroyed_at=NOW),  # embedded on MongoDB
        replace(v2, disabled=True),  # embedded
        replace(v3, destroy_at=NOW + 24 * HOUR),  # embedded
        v4,
        replace(v5, destroy_at=NOW, destroyed_at=NOW),  # in key_versions
        v6,
        v7,
    )
    assert stores.serving.update_version_states(replace(key, versions=versions, min_decryption_version=2), key.revision)
    stores.store.add_encryptions({VersionRef("t1", key.key_id, 4): 7, VersionRef("t1", key.key_id, 6): 2})

    listed = [v for page in _all_pages(stores, key, limit=3) for v in page]
    stored = _stored(stores, key)
    held = {v.version for v in stored.versions}
    assert held == {1, 2, 3, 5, 7}, "get_key holds the primary and the versions with a state"
    assert [v for v in listed if v.version in held] == list(stored.versions), "as get_key holds them"
    by_number = {v.version: v for v in listed}
    assert by_number[2].disabled
    assert by_number[3].destroy_at == NOW + 24 * HOUR and not by_number[3].destroyed
    assert (by_number[4].encryptions, by_number[6].encryptions) == (7, 2)
    for number in (1, 5):
        assert by_number[number].destroyed_at == NOW
        assert by_number[number].wrapped_material == b"", f"version {number}'s material is erased"
    assert all(by_number[n].wrapped_material for n in (2, 3, 4, 6, 7))
