"""The reservation arithmetic of the usage budget (service/usage_budget.py): several simulated servers, each a
UsageBudget with its own connection to one real SQLite store, encrypting from threads at once."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crypto_server.domain.errors import KeyNotFound, KeyVersionExhausted, StoreCallRefused, StoreUnavailable
from crypto_server.domain.keys import Key, KeyPolicy, KeyType, KeyVersion
from crypto_server.service.usage_budget import GIVE_BACK_BATCH, UsageBudget
from crypto_server.storage.port import Reservation, VersionRef
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock

NOW = datetime(2030, 1, 1, tzinfo=UTC)


class CountingStore:
    """The usage counters of a real store, counting the round trips and failing on demand."""

    def __init__(self, inner: SqliteKeyStore) -> None:
        self.inner = inner
        self.reservations = 0
        self.give_backs = 0
        self.marks = 0
        self.unavailable = False
        # A give-back refused before it reached the store (the circuit open): nothing written.
        self.refused = False
        # A give-back that lands and is then reported failed (a timeout after the write).
        self.fail_after_writing = False
        # A give-back lost on its way (a connection dropped): nothing written, and the server cannot know it.
        self.lost = False
        self.give_back_ids: list[str] = []

    def reserve_encryptions(self, version: VersionRef, wanted: int, limit: int) -> Reservation | None:
        self.reservations += 1
        return self.inner.reserve_encryptions(version, wanted, limit)

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        self.give_backs += 1
        if self.unavailable:
            raise StoreUnavailable("the store is down (test)")
        return self.inner.add_encryptions(counts)

    def give_back_encryptions(self, give_back_id: str, counts: Mapping[VersionRef, int]) -> None:
        self.give_backs += 1
        self.give_back_ids.append(give_back_id)
        if self.refused:
            raise StoreCallRefused("the key store is unreachable (test)")
        if self.lost:
            raise StoreUnavailable("the connection was lost (test)")
        self.inner.give_back_encryptions(give_back_id, counts)
        if self.fail_after_writing:
            raise StoreUnavailable("the store did not answer in time (test)")

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        self.marks += 1
        self.inner.mark_rotation_due(version, now)


class Deployment:
    """One SQLite store, and servers made on it on demand (each with its own store connection)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.store = SqliteKeyStore(directory)
        self._opened = [self.store]
        self.version = self.add_key()

    def add_key(self) -> VersionRef:
        """A new key of tenant t1 in the store: its first version."""
        material = KeyVersion(
            version=1, created_at=NOW, expires_at=None, parent_version=1, wrapped_material=os.urandom(60)
        )
        key = Key(
            key_id=str(uuid.uuid4()),
            tenant_id="t1",
            key_type=KeyType.DATA,
            disabled=False,
            primary_version=1,
            versions=(material,),
            created_at=NOW,
            policy=KeyPolicy(None, None),
            labels={},
            parent_key_id="parent",
            integrity_tag=b"tag",
        )
        self.store.insert_key(key)
        return VersionRef("t1", key.key_id, 1)

    def server(
        self, *, hard_limit: int, block: int, soft_limit: int | None = None
    ) -> tuple[UsageBudget, CountingStore]:
        store = SqliteKeyStore(self.directory)
        self._opened.append(store)
        counting = CountingStore(store)
        budget = UsageBudget(
            counting,
            FakeClock(NOW),
            soft_limit=soft_limit or hard_limit,
            hard_limit=hard_limit,
            flush_every=block,
            flush_interval_s=0,  # no thread: the tests run the passes
        )
        return budget, counting

    def stored(self, version: VersionRef | None = None) -> int:
        ref = version or self.version
        return self.store.add_encryptions({ref: 0})[ref]

    def close(self) -> None:
        for store in self._opened:
            store.close()


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    made = Deployment(tmp_path)
    yield made
    made.close()


def _encrypt_until_refused(budget: UsageBudget, version: VersionRef, made: list[int], start: threading.Barrier) -> None:
    start.wait()
    count = 0
    try:
        while True:
            budget.record(version)
            count += 1
    except KeyVersionExhausted:
        made.append(count)


def test_servers_reserving_at_once_make_exactly_the_hard_limit_and_never_more(deployment: Deployment) -> None:
    hard_limit, block, servers, threads_each = 1000, 7, 4, 3
    budgets = [deployment.server(hard_limit=hard_limit, block=block, soft_limit=800)[0] for _ in range(servers)]
    made: list[int] = []
    start = threading.Barrier(servers * threads_each)
    threads = [
        threading.Thread(target=_encrypt_until_refused, args=(budget, deployment.version, made, start))
        for budget in budgets
        for _ in range(threads_each)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # Every thread ran until its server was refused: every use reserved was used, and no more than the limit.
    assert len(made) == servers * threads_each
    assert sum(made) == hard_limit
    assert deployment.stored() == hard_limit
    assert deployment.store.keys_due_for_rotation(NOW, 10) == [("t1", deployment.version.key_id)], "soft limit"
    for budget in budgets:
        budget.stop()
    assert deployment.stored() == hard_limit, "nothing unused to give back"


def test_one_store_round_trip_per_block(deployment: Deployment) -> None:
    budget, store = deployment.server(hard_limit=100, block=10)
    for _ in range(10):
        budget.record(deployment.version)
    assert store.reservations == 1
    budget.record(deployment.version)
    assert store.reservations == 2
    assert budget.held() == {deployment.version: 9}
    assert deployment.stored() == 20, "the stored count includes what is reserved"


def test_unused_reservations_come_back_after_an_idle_pass_and_at_shutdown(deployment: Deployment) -> None:
    a, _ = deployment.server(hard_limit=100, block=10)
    b, _ = deployment.server(hard_limit=100, block=10)
    for _ in range(3):
        a.record(deployment.version)
    for _ in range(5):
        b.record(deployment.version)
    assert deployment.stored() == 20

    a.flush()  # used since the last pass: kept
    assert a.held() == {deployment.version: 7}
    a.flush()  # idle for a whole pass: given back and forgotten
    assert a.held() == {}
    assert deployment.stored() == 13
    b.stop()
    assert deployment.stored() == 3 + 5, "exact once every server has stopped cleanly"

    b.record(deployment.version)  # a call still running after the stop reserves one use only
    assert deployment.stored() == 3 + 5 + 1


def test_a_crashed_servers_reservation_stays_counted_and_the_bound_holds(deployment: Deployment) -> None:
    crashed, _ = deployment.server(hard_limit=50, block=10)
    crashed.record(deployment.version)  # then it dies: its 9 unused uses are never given back
    survivor, _ = deployment.server(hard_limit=50, block=10)
    made: list[int] = []
    _encrypt_until_refused(survivor, deployment.version, made, threading.Barrier(1))
    assert made == [50 - 10]
    assert 1 + made[0] <= 50
    assert deployment.stored() == 50


def test_a_refused_version_is_refused_from_memory_until_the_next_pass(deployment: Deployment) -> None:
    a, store = deployment.server(hard_limit=6, block=4)
    b, _ = deployment.server(hard_limit=6, block=4)
    b.record(deployment.version)  # b holds 3 unused of the 4 it reserved
    for _ in range(2):
        a.record(deployment.version)  # the last 2 of the 6
    for _ in range(3):
        with pytest.raises(KeyVersionExhausted):
            a.record(deployment.version)
    assert store.reservations == 2, "one reservation granted nothing; the refusals after it asked no store"

    b.flush()
    b.flush()  # b gives its 3 back
    a.flush()  # a forgets the refusal and asks again on its next call
    for _ in range(3):
        a.record(deployment.version)
    assert store.reservations == 3
    with pytest.raises(KeyVersionExhausted):
        a.record(deployment.version)
    assert deployment.stored() == 6


def test_a_give_back_the_store_never_received_is_sent_again_and_never_spent(deployment: Deployment) -> None:
    budget, store = deployment.server(hard_limit=100, block=10)
    budget.record(deployment.version)
    budget.flush()
    store.refused = True
    with pytest.raises(StoreCallRefused):
        budget.flush()
    assert budget.held() == {}, "given back, whatever the outcome: never spent again"
    assert budget.unsent() == {deployment.version: 9}
    with pytest.raises(StoreCallRefused):
        budget.flush()
    store.refused = False
    budget.flush()
    assert budget.unsent() == {}
    assert deployment.stored() == 1
    assert len(set(store.give_back_ids)) == 1, "every attempt of one give-back under one id"


def test_a_give_back_that_landed_but_was_reported_failed_is_applied_once(deployment: Deployment) -> None:
    """Issue 22: a give-back that timed out after the write kept its uses in memory and gave them back again on
    the next pass, taking the stored count below the true one and then below zero."""
    budget, store = deployment.server(hard_limit=100, block=10)
    for _ in range(3):
        budget.record(deployment.version)
    budget.flush()
    store.fail_after_writing = True
    with pytest.raises(StoreUnavailable):
        budget.flush()
    assert deployment.stored() == 3, "the give-back landed"
    assert budget.held() == {} and budget.unsent() == {}, "its outcome unknown: neither spent nor sent again"
    store.fail_after_writing = False
    budget.flush()
    budget.flush()
    assert deployment.stored() == 3, "never below the 3 encryptions made"

    # The version used again takes a fresh block; what was given back stays given.
    budget.record(deployment.version)
    assert budget.held() == {deployment.version: 9}
    budget.flush()
    budget.flush()
    assert deployment.stored() == 4


def test_a_give_back_lost_on_its_way_leaves_the_uses_counted(deployment: Deployment) -> None:
    """The server cannot tell a lost give-back from one that landed: the count errs high, never low."""
    budget, store = deployment.server(hard_limit=100, block=10)
    budget.record(deployment.version)
    budget.flush()
    store.lost = True
    with pytest.raises(StoreUnavailable):
        budget.flush()
    store.lost = False
    budget.flush()
    assert budget.unsent() == {}
    assert deployment.stored() == 10, "the 9 unused uses stay counted, as a crashed server's would"


def test_a_pass_gives_back_many_versions_in_bounded_batches(deployment: Deployment) -> None:
    budget, store = deployment.server(hard_limit=100, block=10)
    refs = [deployment.version] + [deployment.add_key() for _ in range(GIVE_BACK_BATCH)]
    for ref in refs:
        budget.record(ref)
    budget.flush()
    budget.flush()
    assert len(store.give_back_ids) == 2, "101 versions: two give-backs"
    assert all(deployment.stored(ref) == 1 for ref in refs)


def test_a_stop_sends_what_the_store_never_received(deployment: Deployment) -> None:
    budget, store = deployment.server(hard_limit=100, block=10)
    budget.record(deployment.version)
    budget.flush()
    store.refused = True
    with pytest.raises(StoreCallRefused):
        budget.flush()
    store.refused = False
    budget.stop()
    assert deployment.stored() == 1


def test_a_version_no_longer_stored_is_refused(deployment: Deployment) -> None:
    budget, _ = deployment.server(hard_limit=100, block=10)
    gone = VersionRef("t1", deployment.version.key_id, 9)
    with pytest.raises(KeyNotFound):
        budget.record(gone)
    assert budget.held() == {}


def test_a_batch_takes_its_uses_in_one_call_and_never_past_the_hard_limit(deployment: Deployment) -> None:
    budget, store = deployment.server(hard_limit=25, block=10)
    budget.record(deployment.version)

    assert budget.record_many(deployment.version, 9) == (9, None), "the rest of the first block, no store round trip"
    assert store.reservations == 1
    counted, refusal = budget.record_many(deployment.version, 40)
    assert counted == 15, "two more blocks, the second cut to what was left"
    assert isinstance(refusal, KeyVersionExhausted), "what the other 25 items of the batch get"
    assert deployment.stored() == 25
    with pytest.raises(KeyVersionExhausted):
        budget.record_many(deployment.version, 1)
    with pytest.raises(KeyVersionExhausted):
        budget.record(deployment.version)
    assert budget.held() == {deployment.version: 0}


def test_a_batch_shares_the_hard_limit_with_another_server_exactly(deployment: Deployment) -> None:
    first, _ = deployment.server(hard_limit=30, block=8)
    second, _ = deployment.server(hard_limit=30, block=8)
    assert first.record_many(deployment.version, 5) == (5, None)  # holds 3 more
    assert second.record_many(deployment.version, 100)[0] == 22, "all the store had left"
    assert first.record_many(deployment.version, 10)[0] == 3, "its own reservation, then refused"
    assert deployment.stored() == 30


def test_a_version_over_its_soft_limit_is_marked_once_per_pass_not_on_every_reservation(deployment: Deployment) -> None:
    """Each mark is a store write and drops the key's Redis copy: repeated once per pass until the key rotates."""
    budget, store = deployment.server(hard_limit=1000, block=10, soft_limit=20)
    for _ in range(60):  # six blocks, four of them at or over the soft limit
        budget.record(deployment.version)
    assert store.reservations == 6
    assert store.marks == 1
    budget.flush()  # a pass: the key may have been rescheduled meanwhile, so the next reservation marks again
    for _ in range(20):
        budget.record(deployment.version)
    assert store.marks == 2
