"""The change poller: changes made by another process reach this one's keyring and caches, once each, and a
cache that cannot be fixed now is retried until it can, even after the change left the polling window; a copy a
cache served older than the store is dropped however long ago the change was."""

from __future__ import annotations

import os
import time
from pathlib import Path

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.domain.keys import KeyType
from crypto_server.service.change_poller import ChangePoller
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.keyring import Keyring
from crypto_server.storage.port import CachedCopy, KeyChange, LocalInvalidation
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FakeClock


class _Wall:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def _setup(tmp_path: Path) -> tuple[SqliteKeyStore, Keyring, KeyLifecycle, KeyLifecycle]:
    """One store file, two processes' worth of keyrings: `other` writes, `mine` must learn of it."""
    store = SqliteKeyStore(tmp_path)
    root = AESGCM(os.urandom(32))
    mine = Keyring(store, root, ttl_s=300, max_keys=100)
    theirs = Keyring(store, root, ttl_s=300, max_keys=100)
    secret = b"s" * 32
    return (
        store,
        mine,
        KeyLifecycle(store, mine, FakeClock(), LocalInvalidation(mine), schedule=store, request_key_id_secret=secret),
        KeyLifecycle(
            store, theirs, FakeClock(), LocalInvalidation(theirs), schedule=store, request_key_id_secret=secret
        ),
    )


def test_a_change_by_another_process_drops_the_key_held_here(tmp_path: Path) -> None:
    store, mine, _, other = _setup(tmp_path)
    key = other.create_key("t1", KeyType.DATA)
    mine.get("t1", key.key_id)
    poller = ChangePoller(store, mine, interval_s=1, margin_s=7)
    other.disable_key("t1", key.key_id)
    assert mine.fresh("t1", key.key_id) is not None, "nothing told this keyring yet"
    poller.poll_once()
    assert mine.fresh("t1", key.key_id) is None
    mine.get("t1", key.key_id)
    poller.poll_once()
    assert mine.fresh("t1", key.key_id) is not None, "the same change is applied once, not on every poll"


def test_a_master_key_change_drops_the_whole_tenant(tmp_path: Path) -> None:
    store, mine, _, other = _setup(tmp_path)
    key = other.create_key("t1", KeyType.DATA)
    mine.get("t1", key.key_id)
    master = store.get_master_key("t1")
    assert master is not None
    poller = ChangePoller(store, mine, interval_s=1, margin_s=7)
    other.disable_key("t1", master.key_id)
    poller.poll_once()
    assert mine.fresh("t1", key.key_id) is None


def test_a_cache_that_cannot_be_fixed_is_retried_after_the_change_leaves_the_window(tmp_path: Path) -> None:
    store, mine, _, other = _setup(tmp_path)
    key = other.create_key("t1", KeyType.DATA)
    cache_up = False
    fixed: list[KeyChange] = []

    def fix(change: KeyChange) -> bool:
        if cache_up:
            fixed.append(change)
        return cache_up

    wall = _Wall(start=time.time())
    poller = ChangePoller(store, mine, interval_s=1, margin_s=7, cache_fixes=[fix], wall_clock=wall)
    other.rotate_key("t1", key.key_id)
    poller.poll_once()
    wall.now += 60  # long past the window
    poller.poll_once()
    assert not fixed
    cache_up = True
    wall.now += 1
    poller.poll_once()
    assert [(c.key_id, c.revision) for c in fixed][-1:] == [(key.key_id, 1)]


def test_a_copy_a_cache_served_older_than_the_store_is_dropped_however_long_ago_the_change(tmp_path: Path) -> None:
    """A cache that lost writes (Redis restarted from an older snapshot) serves an older state long after the
    change was handled: the copy is checked against the store at the next poll, dropped from memory and from the
    cache. A copy at the store's revision is kept."""
    store, mine, _, other = _setup(tmp_path)
    key = other.create_key("t1", KeyType.DATA)
    before = store.get_key("t1", key.key_id)
    assert before is not None
    other.disable_key("t1", key.key_id)
    fixed: list[KeyChange] = []
    served: list[CachedCopy] = []

    def fix(change: KeyChange) -> bool:
        fixed.append(change)
        return True

    def take() -> list[CachedCopy]:
        taken = list(served)
        served.clear()
        return taken

    wall = _Wall(start=time.time())
    poller = ChangePoller(
        store, mine, interval_s=1, margin_s=7, cache_fixes=[fix], served_copies=[take], wall_clock=wall
    )
    poller.poll_once()  # the change, handled once
    wall.now += 3600
    poller.poll_once()
    fixed.clear()
    # The cache comes back with the state from before the change, and this server reads it.
    mine.remember(before)
    served.append(CachedCopy("t1", key.key_id, KeyType.DATA, before.revision))
    poller.poll_once()
    assert [(change.key_id, change.revision) for change in fixed] == [(key.key_id, before.revision + 1)]
    assert mine.fresh("t1", key.key_id) is None
    # The current state, read again: kept.
    current = mine.get("t1", key.key_id)
    assert current.key.disabled
    served.append(CachedCopy("t1", key.key_id, KeyType.DATA, current.key.revision))
    fixed.clear()
    poller.poll_once()
    assert not fixed
    assert mine.fresh("t1", key.key_id) is not None
    # A copy of a key the store does not hold: nothing vouches for it.
    served.append(CachedCopy("t1", "2f0e5e42-5d38-4b5c-9d2c-5a3f8f0b4c11", KeyType.DATA, 4))
    poller.poll_once()
    assert [(change.key_id, change.revision) for change in fixed] == [("2f0e5e42-5d38-4b5c-9d2c-5a3f8f0b4c11", 5)]
