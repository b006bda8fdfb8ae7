"""The storage contract (storage/port.py), role by role, run directly against every store.

Each test runs on SQLite, on MongoDB (a real server) and on MongoDB behind the Redis cache (a real
redis-server), wired as app.py wires them: key reads and writes (KeyServing, MasterKeyRewrap) through the
cache, every other role to the database. A behaviour of the stores proven here need not be repeated over
every backend by the gRPC suite.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from crypto_server.domain.keys import KEY_STATE_RULE, Key, KeyPolicy, KeyState, KeyType, KeyVersion
from crypto_server.storage.mongo import MongoKeyStore
from crypto_server.storage.port import (
    GIVE_BACK_IDS_KEPT,
    CachedCopy,
    DuplicateKeyId,
    DuplicateMasterKey,
    KeyQuery,
    KeyServing,
    KeyStore,
    ListCursor,
    MasterKeyRewrap,
    Reservation,
    VersionRef,
)
from crypto_server.storage.redis.cache import RedisCachedKeyStore
from crypto_server.storage.redis.guard import RedisGuard, connect
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.servers import MongoServer, RedisServer

NOW = datetime(2030, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
STORES = ["sqlite", "mongo", "mongo+redis"]
_databases = itertools.count()


@dataclass
class Stores:
    """One store under test, as app.py wires it."""

    store: KeyStore  # every role, straight to the database
    serving: KeyServing  # key reads and writes: through the Redis cache when there is one
    rewrap: MasterKeyRewrap  # likewise


@pytest.fixture(params=STORES)
def stores(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stores]:
    store: KeyStore
    if request.param == "sqlite":
        store = SqliteKeyStore(tmp_path)
        yield Stores(store, store, store)
        store.close()
        return
    mongo: MongoServer = request.getfixturevalue("mongo_server")
    database = f"contract{os.getpid()}_{next(_databases)}"
    store = MongoKeyStore(mongo.uri, database)
    if request.param == "mongo":
        yield Stores(store, store, store)
    else:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        client = connect(redis_server.url, timeout_s=1.0)
        cache = RedisCachedKeyStore(store, client, f"contract:{database}", ttl_s=60, guard=RedisGuard())
        yield Stores(store, cache, cache)
        client.close()
    store.close()
    mongo.client().drop_database(database)


def _version(number: int, *, created_at: datetime = NOW, expires_at: datetime | None = None) -> KeyVersion:
    return KeyVersion(
        version=number,
        created_at=created_at,
        expires_at=expires_at,
        parent_version=1,
        wrapped_material=os.urandom(60),
        request_id=None,
    )


def _key(
    tenant_id: str = "t1",
    key_type: KeyType = KeyType.DATA,
    *,
    created_at: datetime = NOW,
    expires_at: datetime | None = None,
    disabled: bool = False,
    rotation_period: timedelta | None = None,
) -> Key:
    return Key(
        key_id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        key_type=key_type,
        disabled=disabled,
        primary_version=1,
        versions=(_version(1, created_at=created_at, expires_at=expires_at),),
        created_at=created_at,
        policy=KeyPolicy(None, rotation_period),
        labels={"team": "contract"},
        parent_key_id=None if key_type is KeyType.MASTER else "parent",
        integrity_tag=b"tag",
    )


def _every_version(stores: Stores, key: Key) -> list[KeyVersion]:
    """Every version of the key as the database holds it now (a read holds only some: domain/keys.py)."""
    return stores.store.list_versions(key.tenant_id, key.key_id, 0, 1000)


def _stored(stores: Stores, key: Key) -> Key:
    """The key as the database holds it now (not the cache)."""
    found = stores.store.get_key(key.tenant_id, key.key_id)
    assert found is not None
    return found


# -- KeyReader / KeyWriter --------------------------------------------------------------------------------


def test_an_inserted_key_reads_back_as_written_and_only_for_its_tenant(stores: Stores) -> None:
    master = _key(key_type=KeyType.MASTER)
    data = _key(expires_at=NOW + HOUR, rotation_period=HOUR)
    for key in (master, data):
        stores.serving.insert_key(key)
    for key in (master, data):
        got = stores.serving.get_key("t1", key.key_id)
        assert got == key
        assert got is not None and got.integrity_tag == key.integrity_tag
        assert stores.serving.get_key("t1", key.key_id) == key, "a second read (from the cache, if any) agrees"
    assert stores.serving.get_master_key("t1") == master
    assert stores.serving.get_key("t2", data.key_id) is None
    assert stores.serving.get_key("t1", str(uuid.uuid4())) is None
    assert stores.serving.get_master_key("t2") is None


def test_insert_refuses_a_repeated_key_id_and_a_second_master_key(stores: Stores) -> None:
    master = _key(key_type=KeyType.MASTER)
    stores.serving.insert_key(master)
    with pytest.raises(DuplicateKeyId):
        stores.serving.insert_key(master)
    with pytest.raises(DuplicateMasterKey):
        stores.serving.insert_key(_key(key_type=KeyType.MASTER))
    stores.serving.insert_key(_key("t2", KeyType.MASTER))  # one per tenant


def test_list_pages_oldest_first_exactly_once_with_ties_and_filters(stores: Stores) -> None:
    # Three keys share one instant: the key id breaks the tie, so no page repeats or skips one.
    moments = [NOW, NOW + HOUR, NOW + HOUR, NOW + HOUR, NOW + 2 * HOUR]
    created = [_key(created_at=moment) for moment in moments]
    session = _key(key_type=KeyType.SESSION, created_at=NOW + 3 * HOUR)
    for key in [*created, session, _key("t2")]:
        stores.serving.insert_key(key)
    expected = sorted([*created, session], key=lambda k: (k.created_at, k.key_id))

    listed: list[Key] = []
    after = None
    while True:
        page = stores.serving.list_keys(KeyQuery("t1", limit=2, now=NOW, after=after))
        assert len(page) <= 2
        listed += page
        if len(page) < 2:
            break
        after = ListCursor(page[-1].created_at, page[-1].key_id)
    assert [key.key_id for key in listed] == [key.key_id for key in expected]
    assert listed == expected
    sessions = stores.serving.list_keys(KeyQuery("t1", limit=10, now=NOW, key_type=KeyType.SESSION))
    assert [key.key_id for key in sessions] == [session.key_id]
    assert stores.serving.list_keys(KeyQuery("nobody", limit=10, now=NOW)) == []


def test_add_version_is_a_compare_and_set_on_the_revision(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    read = stores.serving.get_key("t1", key.key_id)
    assert read is not None
    rotated = read.with_new_primary(_version(2, created_at=NOW + HOUR))
    assert stores.serving.add_version(rotated, read.revision)
    after = stores.serving.get_key("t1", key.key_id)
    assert after is not None
    assert after.primary_version == 2 and [v.version for v in after.versions] == [2], "a read holds the primary"
    assert [v.version for v in _every_version(stores, key)] == [1, 2]
    assert after.revision == read.revision + 1
    # A writer that read the old revision loses, whichever version it brings.
    assert not stores.serving.add_version(read.with_new_primary(_version(2)), read.revision)
    assert stores.serving.get_key("t1", key.key_id) == after
    assert stores.serving.pending_version("t1", key.key_id, 3) is None
    assert stores.serving.pending_version("t1", key.key_id, 2) is None, "the primary is not pending"


def test_a_rotation_with_a_request_id_already_used_by_the_key_is_refused(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    first = replace(_version(2), request_id="rotate-1")
    assert stores.serving.add_version(key.with_new_primary(first), key.revision)
    again = _stored(stores, key)
    assert not stores.serving.add_version(again.with_new_primary(replace(_version(3), request_id="rotate-1")), 1)


def test_a_read_holds_the_primary_and_every_version_with_a_state_of_its_own(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    current = _stored(stores, key)
    for number in range(2, 8):
        version = replace(_version(number), request_id=f"rotate-{number}")
        assert stores.serving.add_version(current.with_new_primary(version), current.revision)
        current = _stored(stores, key)
    whole = current.with_versions(_every_version(stores, key))
    assert whole.holds_every_version and [v.version for v in whole.versions] == list(range(1, 8))
    later = NOW + 30 * 24 * HOUR
    states = {
        2: {"disabled": True},
        3: {"destroy_at": later},
        4: {"destroyed_at": NOW, "wrapped_material": b""},
    }
    changed = replace(
        whole,
        versions=tuple(replace(v, **states.get(v.version, {})) for v in whole.versions),
    )
    assert stores.serving.update_version_states(changed, whole.revision)
    for read in (stores.serving.get_key("t1", key.key_id), _stored(stores, key)):
        assert read is not None
        assert [v.version for v in read.versions] == [2, 3, 4, 7], "the stated versions and the primary"
        held = {v.version: v for v in read.versions}
        assert held[2].disabled and held[3].destroy_at == later and held[4].destroyed
        assert held[4].wrapped_material == b"" and held[7].request_id == "rotate-7"
    assert [v.version for v in stores.serving.list_versions("t1", key.key_id, 4, 2)] == [5, 6]
    assert stores.serving.list_versions("t2", key.key_id, 0, 10) == [], "another tenant's key"

    found = stores.serving.version_for_request("t1", key.key_id, "rotate-5")
    assert found is not None and found.version == 5
    assert stores.serving.version_for_request("t1", key.key_id, "rotate-99") is None
    assert stores.serving.version_for_request("t2", key.key_id, "rotate-5") is None, "another tenant's key"


def test_store_tags_writes_every_tag_at_the_revision_read(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    current = _stored(stores, key)
    assert stores.serving.add_version(current.with_new_primary(_version(2)), current.revision)
    current = _stored(stores, key)
    whole = current.with_versions(_every_version(stores, key))
    tagged = replace(
        whole,
        integrity_tag=b"key-tag",
        versions=tuple(replace(v, integrity_tag=f"tag-{v.version}".encode()) for v in whole.versions),
    )
    assert not stores.serving.store_tags(tagged, current.revision - 1), "only from the revision read"
    assert stores.serving.store_tags(tagged, current.revision)
    after = _stored(stores, key)
    assert after.integrity_tag == b"key-tag" and after.revision == current.revision + 1
    assert [v.integrity_tag for v in _every_version(stores, key)] == [b"tag-1", b"tag-2"]
    cached = stores.serving.get_key("t1", key.key_id)
    assert cached is not None and cached.integrity_tag == b"key-tag" and cached.primary.integrity_tag == b"tag-2"


def test_update_key_is_a_compare_and_set_on_the_revision(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    changed = replace(key.with_disabled(True), labels={"team": "other"}, integrity_tag=b"tag2")
    assert stores.serving.update_key(changed, key.revision)
    got = stores.serving.get_key("t1", key.key_id)
    assert got is not None
    assert got.disabled and dict(got.labels) == {"team": "other"} and got.integrity_tag == b"tag2"
    assert got.revision == key.revision + 1
    assert not stores.serving.update_key(key.with_disabled(False), key.revision), "a stale writer loses"
    assert not stores.serving.update_key(replace(got, tenant_id="t2"), got.revision), "another tenant's key"
    assert stores.serving.get_key("t1", key.key_id) == got


# -- the effective state: one rule (domain/keys.py KEY_STATE_RULE), translated by each store ---------------

# (disabled, primary expires_at relative to NOW or None)
_STATE_CASES = [
    (False, None),
    (False, HOUR),
    (False, timedelta(0)),  # expires exactly now: expired
    (False, -HOUR),
    (True, None),
    (True, HOUR),
    (True, -HOUR),
]


def test_state_filters_and_counts_agree_with_key_state_at(stores: Stores) -> None:
    keys = [
        _key(key_type=key_type, disabled=disabled, expires_at=None if offset is None else NOW + offset)
        for disabled, offset in _STATE_CASES
        for key_type in (KeyType.DATA, KeyType.SESSION)
    ]
    keys.append(_key("t2", KeyType.MASTER))
    for key in keys:
        stores.serving.insert_key(key)
    tenant_keys = [key for key in keys if key.tenant_id == "t1"]
    for state in (condition.state for condition in KEY_STATE_RULE):  # the states ListKeys filters on
        listed = stores.serving.list_keys(KeyQuery("t1", limit=100, now=NOW, state=state))
        assert {key.key_id for key in listed} == {key.key_id for key in tenant_keys if key.state_at(NOW) is state}, (
            state
        )
    counts = stores.store.key_counts(NOW)
    expected: dict[tuple[KeyType, KeyState], int] = {}
    for key in keys:
        expected[(key.key_type, key.state_at(NOW))] = expected.get((key.key_type, key.state_at(NOW)), 0) + 1
    assert counts.by_type_and_state == expected
    assert counts.tenants == 2


# -- RotationSchedule and UsageCounters -------------------------------------------------------------------


def test_keys_due_for_rotation_earliest_first_up_to_the_limit(stores: Stores) -> None:
    later = _key(created_at=NOW, rotation_period=2 * HOUR)
    sooner = _key(created_at=NOW, rotation_period=HOUR)
    never = _key(created_at=NOW)
    for key in (later, sooner, never):
        stores.serving.insert_key(key)
    assert stores.store.keys_due_for_rotation(NOW, 10) == []
    due = stores.store.keys_due_for_rotation(NOW + 3 * HOUR, 10)
    assert due == [("t1", sooner.key_id), ("t1", later.key_id)]
    assert stores.store.keys_due_for_rotation(NOW + 3 * HOUR, 1) == [("t1", sooner.key_id)]


def test_reschedule_applies_only_at_the_revision_read(stores: Stores) -> None:
    key = _key(rotation_period=HOUR)
    stores.serving.insert_key(key)
    stores.store.reschedule_rotation("t1", key.key_id, key.revision + 1, None)  # a stale revision: ignored
    assert stores.store.keys_due_for_rotation(NOW + HOUR, 10) == [("t1", key.key_id)]
    stores.store.reschedule_rotation("t1", key.key_id, key.revision, NOW + 5 * HOUR)
    assert stores.store.keys_due_for_rotation(NOW + HOUR, 10) == []
    assert stores.store.keys_due_for_rotation(NOW + 5 * HOUR, 10) == [("t1", key.key_id)]
    assert _stored(stores, key).revision == key.revision, "a schedule is not a change of the key"


def test_mark_rotation_due_only_while_the_version_is_primary(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    stores.store.mark_rotation_due(VersionRef("t1", key.key_id, 2), NOW)  # not the primary: nothing
    assert stores.store.keys_due_for_rotation(NOW + 1000 * HOUR, 10) == []
    stores.store.mark_rotation_due(VersionRef("t1", key.key_id, 1), NOW)
    assert stores.store.keys_due_for_rotation(NOW, 10) == [("t1", key.key_id)]


def test_concurrent_encryption_counts_all_land(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    assert stores.serving.add_version(key.with_new_primary(_version(2)), key.revision)
    first, second = VersionRef("t1", key.key_id, 1), VersionRef("t1", key.key_id, 2)
    gone = VersionRef("t1", key.key_id, 9)
    threads, flushes = 4, 5
    barrier = threading.Barrier(threads)

    def flush() -> None:
        barrier.wait()
        for _ in range(flushes):
            stores.store.add_encryptions({first: 1, second: 2})

    workers = [threading.Thread(target=flush) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    totals = stores.store.add_encryptions({first: 1, second: 1, gone: 5})
    assert totals == {first: threads * flushes + 1, second: 2 * threads * flushes + 1}
    assert [v.encryptions for v in _every_version(stores, key)] == [threads * flushes + 1, 2 * threads * flushes + 1]
    assert stores.store.add_encryptions({VersionRef("t2", key.key_id, 1): 1}) == {}, "another tenant's key"


def test_reservations_grant_exactly_the_limit_however_many_reserve_at_once(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    assert stores.serving.add_version(key.with_new_primary(_version(2)), key.revision)
    # Version 1 in the key document (MongoDB), version 2 beside it: both places the store keeps counts.
    refs = [VersionRef("t1", key.key_id, 1), VersionRef("t1", key.key_id, 2)]
    limit, block, threads = 100, 7, 6
    granted: dict[VersionRef, list[int]] = {ref: [] for ref in refs}
    barrier = threading.Barrier(threads)

    def reserve_until_refused() -> None:
        barrier.wait()
        for ref in refs:
            while True:
                reservation = stores.store.reserve_encryptions(ref, block, limit)
                assert reservation is not None
                assert 0 <= reservation.granted <= block and reservation.total <= limit
                if not reservation.granted:
                    break
                granted[ref].append(reservation.granted)  # list.append: atomic under the GIL

    workers = [threading.Thread(target=reserve_until_refused) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    for ref in refs:
        assert sum(granted[ref]) == limit, "every use granted once, none past the limit"
        assert sorted(granted[ref])[0] == limit % block, "only the last block is cut short"
    assert [v.encryptions for v in _every_version(stores, key)] == [limit, limit]

    # Unused uses given back (a negative count) can be reserved again, and only they.
    stores.store.give_back_encryptions("g1", {refs[0]: 5})
    assert stores.store.add_encryptions({refs[0]: 0}) == {refs[0]: limit - 5}
    assert stores.store.reserve_encryptions(refs[0], block, limit) == Reservation(5, limit)
    assert stores.store.reserve_encryptions(refs[1], block, limit + 3) == Reservation(3, limit + 3)
    assert stores.store.reserve_encryptions(VersionRef("t1", key.key_id, 9), block, limit) is None
    assert stores.store.reserve_encryptions(VersionRef("t1", str(uuid.uuid4()), 1), block, limit) is None


def test_a_give_back_repeated_with_its_id_is_applied_once_per_version(stores: Stores) -> None:
    """A give-back whose outcome was unknown (a timeout after the write, a batch cut part-way) is sent again
    with the same id: where it landed it changes nothing, so a reservation is never given back twice."""
    key = _key()
    stores.serving.insert_key(key)
    assert stores.serving.add_version(key.with_new_primary(_version(2)), key.revision)
    # Version 1 in the key document (MongoDB), version 2 beside it: both places the store keeps counts.
    first, second = VersionRef("t1", key.key_id, 1), VersionRef("t1", key.key_id, 2)
    for ref in (first, second):
        assert stores.store.reserve_encryptions(ref, 100, 1000) == Reservation(100, 100)

    stores.store.give_back_encryptions("server-a-1", {first: 30})  # landed, say, then reported as failed
    stores.store.give_back_encryptions("server-a-1", {first: 30, second: 40})  # the whole batch again
    stores.store.give_back_encryptions("server-a-1", {first: 30, second: 40})
    assert stores.store.add_encryptions({first: 0, second: 0}) == {first: 70, second: 60}
    stores.store.give_back_encryptions("server-b-1", {first: 20})  # another id is another give-back
    assert stores.store.add_encryptions({first: 0}) == {first: 50}
    assert [v.encryptions for v in _every_version(stores, key)] == [50, 60]


def test_a_give_back_never_takes_a_count_below_zero_and_skips_what_is_not_stored(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    ref = VersionRef("t1", key.key_id, 1)
    assert stores.store.reserve_encryptions(ref, 10, 1000) == Reservation(10, 10)
    stores.store.give_back_encryptions(
        "g1",
        {
            ref: 25,
            VersionRef("t1", key.key_id, 9): 5,
            VersionRef("t1", str(uuid.uuid4()), 1): 5,
            VersionRef("t2", key.key_id, 1): 5,  # another tenant's key: left alone
        },
    )
    assert stores.store.add_encryptions({ref: 0}) == {ref: 0}
    assert stores.store.reserve_encryptions(ref, 10, 1000) == Reservation(10, 10)


def test_a_version_remembers_its_last_give_back_ids(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    ref = VersionRef("t1", key.key_id, 1)
    stores.store.reserve_encryptions(ref, 1000, 1000)
    for number in range(GIVE_BACK_IDS_KEPT + 5):
        stores.store.give_back_encryptions(f"g{number}", {ref: 1})
    kept = range(5, GIVE_BACK_IDS_KEPT + 5)
    for number in kept:  # the last ones, each applied once
        stores.store.give_back_encryptions(f"g{number}", {ref: 1})
    assert stores.store.add_encryptions({ref: 0}) == {ref: 1000 - GIVE_BACK_IDS_KEPT - 5}


def test_a_reservation_on_a_fresh_version_starts_from_zero(stores: Stores) -> None:
    key = _key()
    stores.serving.insert_key(key)
    assert stores.serving.add_version(key.with_new_primary(_version(2)), key.revision)
    for number in (1, 2):
        ref = VersionRef("t1", key.key_id, number)
        assert stores.store.reserve_encryptions(ref, 4096, 2**32) == Reservation(4096, 4096)
    assert stores.store.reserve_encryptions(VersionRef("t2", key.key_id, 1), 1, 10) is None, "another tenant's key"


# -- Leases -----------------------------------------------------------------------------------------------


def test_a_lease_has_one_holder_until_it_expires_or_is_released(stores: Stores) -> None:
    assert stores.store.acquire_lease("job", "a", NOW, HOUR)
    assert not stores.store.acquire_lease("job", "b", NOW + HOUR / 2, HOUR)
    assert stores.store.acquire_lease("job", "a", NOW + HOUR / 2, HOUR), "the holder renews"
    assert not stores.store.acquire_lease("job", "b", NOW + HOUR, HOUR), "renewed until NOW + 1.5 h"
    assert stores.store.acquire_lease("other-job", "b", NOW, HOUR), "leases are independent"
    assert stores.store.acquire_lease("job", "b", NOW + 2 * HOUR, HOUR), "expired: anyone may take it"
    stores.store.release_lease("job", "a")  # no longer a's: nothing happens
    assert not stores.store.acquire_lease("job", "a", NOW + 2 * HOUR, HOUR)
    stores.store.release_lease("job", "b")
    assert stores.store.acquire_lease("job", "a", NOW + 2 * HOUR, HOUR)


def test_racing_holders_get_the_lease_once(stores: Stores) -> None:
    holders = [f"h{n}" for n in range(4)]
    barrier = threading.Barrier(len(holders))
    won: list[str] = []

    def race(holder: str) -> None:
        barrier.wait()
        if stores.store.acquire_lease("race", holder, NOW, HOUR):
            won.append(holder)

    threads = [threading.Thread(target=race, args=(holder,)) for holder in holders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1


# -- StoreMeta, RootKeyChecks, ChangeFeed, Health -----------------------------------------------------------


def test_meta_values_are_added_once_and_replaced_explicitly(stores: Stores) -> None:
    assert stores.store.get_meta("record") is None
    assert stores.store.add_meta("record", b"first") == b"first"
    assert stores.store.add_meta("record", b"second") == b"first", "the stored one wins"
    stores.store.replace_meta("record", b"third")
    assert stores.store.get_meta("record") == b"third"


def test_root_key_check_is_set_once_and_replaced_explicitly(stores: Stores) -> None:
    assert stores.store.get_root_key_check() is None
    assert stores.store.set_root_key_check(b"check-1") == b"check-1"
    assert stores.store.set_root_key_check(b"check-2") == b"check-1", "the stored one wins"
    stores.store.replace_root_key_check(b"check-3")
    assert stores.store.get_root_key_check() == b"check-3"


def test_has_keys_and_ping(stores: Stores) -> None:
    stores.store.ping()
    assert not stores.store.has_keys()
    stores.store.add_meta("record", b"x")
    assert not stores.store.has_keys(), "metadata is not a key"
    stores.serving.insert_key(_key())
    assert stores.store.has_keys()


def test_changed_keys_lists_each_write_with_its_revision(stores: Stores) -> None:
    # The change feed records the writer's wall clock (not the injected one): ask from a minute ago.
    since = datetime.now(UTC) - timedelta(minutes=1)
    key, untouched = _key(), _key("t2")
    for each in (key, untouched):
        stores.serving.insert_key(each)
    assert stores.serving.update_key(key.with_disabled(True), key.revision)
    changes = {change.key_id: change for change in stores.store.changed_keys(since)}
    assert set(changes) == {key.key_id, untouched.key_id}
    assert (changes[key.key_id].tenant_id, changes[key.key_id].revision) == ("t1", key.revision + 1)
    assert changes[key.key_id].key_type is KeyType.DATA
    assert changes[key.key_id].changed_at >= since
    assert stores.store.changed_keys(datetime.now(UTC) + timedelta(minutes=1)) == []


def test_latest_changes_gives_the_revision_of_each_key_named_under_its_tenant(stores: Stores) -> None:
    key, master = _key(), _key("t2", KeyType.MASTER)
    for each in (key, master):
        stores.serving.insert_key(each)
    assert stores.serving.update_key(key.with_disabled(True), key.revision)
    named = [("t1", key.key_id), ("t2", master.key_id), ("t9", key.key_id), ("t1", str(uuid.uuid4()))]
    latest = {(change.tenant_id, change.key_id): change for change in stores.store.latest_changes(named)}
    assert set(latest) == {("t1", key.key_id), ("t2", master.key_id)}, "another tenant's key or none: nothing"
    assert latest[("t1", key.key_id)].revision == key.revision + 1
    assert latest[("t2", master.key_id)].key_type is KeyType.MASTER
    assert latest[("t2", master.key_id)] in stores.store.changed_keys(datetime.now(UTC) - timedelta(minutes=1))
    assert stores.store.latest_changes([]) == []


# -- MasterKeyRewrap --------------------------------------------------------------------------------------


def test_master_keys_are_rewrapped_one_version_at_a_time_only_from_the_old_bytes(stores: Stores) -> None:
    masters = [_key(tenant, KeyType.MASTER) for tenant in ("t1", "t2", "t3")]
    for master in [*masters, _key()]:
        stores.serving.insert_key(master)
    rotated = masters[0].with_new_primary(_version(2))
    assert stores.serving.add_version(rotated, masters[0].revision)
    listed = list(stores.rewrap.master_keys())
    assert sorted(key.key_id for key in listed) == sorted(key.key_id for key in masters)

    for number, version in ((1, rotated.versions[0]), (2, rotated.versions[1])):
        assert stores.serving.get_key("t1", rotated.key_id) is not None  # now in the cache, if any
        assert not stores.rewrap.replace_wrapped_material("t1", rotated.key_id, number, b"not the old", b"new")
        assert not stores.rewrap.replace_wrapped_material("t2", rotated.key_id, number, version.wrapped_material, b"x")
        before = _stored(stores, rotated).revision
        assert stores.rewrap.replace_wrapped_material("t1", rotated.key_id, number, version.wrapped_material, b"new")
        got = stores.serving.get_key("t1", rotated.key_id)
        assert got is not None
        (read,) = stores.serving.list_versions("t1", rotated.key_id, number - 1, 1)
        assert read.wrapped_material == b"new", "a reader never sees the old wrapping"
        if number == got.primary_version:
            assert got.primary.wrapped_material == b"new"
        assert got.revision > before, "a re-wrap is a change other servers hear of"
    assert [len(key.versions) for key in stores.rewrap.master_keys() if key.key_id == rotated.key_id] == [2], (
        "master_keys holds every version: a root key rotation re-wraps them all"
    )


class _SlowReads:
    """The store, but its next key read is slow: `meanwhile` runs between the read and its answer."""

    def __init__(self, store: SqliteKeyStore) -> None:
        self.store = store
        self.meanwhile: list[Callable[[], None]] = []

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        key = self.store.get_key(tenant_id, key_id)
        if self.meanwhile:
            self.meanwhile.pop()()
        return key

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_a_slow_readers_older_copy_never_replaces_a_version_state_change_in_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """The cache's writes leave the new revision in Redis: a reader that read the store before the write puts
    its older copy afterwards, and put-if-newer must find the newer one there (deleting is not enough)."""
    store = SqliteKeyStore(tmp_path)
    slow = _SlowReads(store)
    client = connect(redis_server.url, timeout_s=1.0)
    namespace = f"slow:{uuid.uuid4()}"
    cache = RedisCachedKeyStore(slow, client, namespace, ttl_s=60, guard=RedisGuard())
    try:
        key = _key()
        store.insert_key(key)
        read = _stored(Stores(store, cache, cache), key)
        destroyed = replace(read.versions[0], wrapped_material=b"", destroy_at=NOW, destroyed_at=NOW)
        erased = replace(read, versions=(destroyed,))
        written: list[bool] = []
        slow.meanwhile.append(lambda: written.append(cache.update_version_states(erased, read.revision)))

        assert cache.get_key(key.tenant_id, key.key_id) == read  # the slow reader: it read before the write
        assert written == [True]

        cached = cache.get_key(key.tenant_id, key.key_id)
        assert cached is not None and cached.revision == read.revision + 1
        assert cached.versions[0].destroyed and cached.versions[0].wrapped_material == b""
        entries = [
            value for name in client.scan_iter(match=f"*{namespace}*") for value in client.hgetall(name).values()
        ]
        assert entries and not any(base64.b64encode(read.versions[0].wrapped_material) in value for value in entries)
    finally:
        client.close()
        store.close()


def test_every_copy_the_redis_cache_serves_is_noted_once_for_checking(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    """Redis may have lost writes (restarted from an older snapshot): each copy served from it is noted, the lowest
    revision per key, for the change poller to check against the store; a copy read from the store is not."""
    store = SqliteKeyStore(tmp_path)
    client = connect(redis_server.url, timeout_s=1.0)
    cache = RedisCachedKeyStore(store, client, f"served:{uuid.uuid4()}", ttl_s=60, guard=RedisGuard())
    try:
        key = _key()
        store.insert_key(key)
        assert cache.get_key(key.tenant_id, key.key_id) is not None  # from the store, into Redis
        assert cache.take_served_copies() == []
        for _ in range(3):
            assert cache.get_key(key.tenant_id, key.key_id) is not None  # from Redis
        assert cache.take_served_copies() == [CachedCopy(key.tenant_id, key.key_id, KeyType.DATA, key.revision)]
        assert cache.take_served_copies() == [], "taken once"
    finally:
        client.close()
        store.close()
