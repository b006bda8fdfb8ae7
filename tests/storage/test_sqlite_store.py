"""Acceptance 5 and the embedded store's contract: durable, wrapped only, safe under concurrency."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain.keys import Key, KeyPolicy, KeyType, KeyVersion
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import ServerHandle, StartServer
from tests.unwrap import unwrapped_material


def _store_files(data_dir: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted(data_dir.glob("keys.sqlite3*"))]


def test_the_database_never_contains_raw_key_bytes(server: ServerHandle) -> None:
    tenants = ("t1", "t2")
    keys = [
        server.create_key(t, kt)
        for t in tenants
        for kt in (resources_pb2.KEY_TYPE_DATA, resources_pb2.KEY_TYPE_SESSION)
    ]
    for key in keys:
        server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=key.tenant_id, key_id=key.key_id))
        server.encrypt(key.tenant_id, key.key_id, b"use it")
    masters = [
        server.keys.ListKeys(key_pb.ListKeysRequest(tenant_id=t, key_type=resources_pb2.KEY_TYPE_MASTER)).keys[0]
        for t in tenants
    ]
    stored = [server.running.store.get_key(key.tenant_id, key.key_id) for key in [*keys, *masters]]
    secrets = [m for key in stored if key is not None for m in unwrapped_material(server, key)]
    assert len(secrets) == 2 * len(keys) + len(masters)
    assert all(len(secret) == 32 for secret in secrets)
    contents = _store_files(server.settings.data_dir)
    assert contents, "the store wrote no file"
    for secret in secrets:
        for window in (secret, secret[:16], secret[16:]):
            assert not any(window in blob for blob in contents)


def test_keys_survive_a_restart(start_server: StartServer) -> None:
    first = start_server()
    key = first.create_key("t1", labels={"team": "messaging"})
    ciphertext = first.encrypt("t1", key.key_id, b"kept").ciphertext
    first.stop()
    second = start_server()
    got = second.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key.key_id)).key
    key.versions[0].encryptions = 1  # the one encryption, flushed at shutdown
    assert got == key
    assert second.decrypt("t1", ciphertext).plaintext == b"kept"


def test_concurrent_rotations_produce_consecutive_versions_once_each(server: ServerHandle) -> None:
    key = server.create_key("t1")
    barrier = threading.Barrier(8)
    results: list[int] = []
    lock = threading.Lock()

    def rotate_several() -> None:
        barrier.wait()
        for _ in range(5):
            rotated = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key.key_id)).key
            with lock:
                results.append(rotated.primary_version)

    threads = [threading.Thread(target=rotate_several) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == list(range(2, 42))
    got = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id=key.key_id)).key
    assert [v.version for v in server.running.store.list_versions("t1", key.key_id, 0, 100)] == list(range(1, 42))
    assert got.primary_version == 41


def test_two_stores_on_one_file_never_duplicate_a_version(server: ServerHandle) -> None:
    key = server.create_key("t1")
    stored = server.running.store.get_key("t1", key.key_id)
    assert isinstance(stored, Key)
    other = SqliteKeyStore(server.settings.data_dir)
    try:
        next_version = KeyVersion(
            version=2,
            created_at=stored.created_at,
            expires_at=None,
            parent_version=1,
            wrapped_material=b"\0" * 60,
        )
        assert other.add_version(stored.with_new_primary(next_version), stored.revision)
        assert not server.running.store.add_version(stored.with_new_primary(next_version), stored.revision)
    finally:
        other.close()


@pytest.fixture
def backend() -> str:
    """These tests look inside the SQLite file: embedded store only."""
    return "embedded"


def test_an_erasure_blocked_by_an_open_reader_stays_due_until_the_log_is_emptied(tmp_path: Path) -> None:
    """The write-ahead log keeps erased material while a reader holds an older snapshot (a running `.backup`):
    the erasing write must neither wait out the busy timeout nor let the key drop out of the destruction
    index before the log is emptied; the next pass's write empties it."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    store = SqliteKeyStore(tmp_path, busy_timeout_s=30)
    wal = store.path.with_name(store.path.name + "-wal")
    material = os.urandom(60)
    versions = tuple(KeyVersion(number, now, None, 1, material if number == 1 else os.urandom(60)) for number in (1, 2))
    key = Key(
        str(uuid.uuid4()), "t", KeyType.DATA, False, 2, versions, now, KeyPolicy(None, None), {}, "parent",
        integrity_tag=b"tag",
    )  # fmt: skip
    store.insert_key(key)
    stored = store.get_key("t", key.key_id)
    assert stored is not None
    reader = sqlite3.connect(store.path)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM keys").fetchall()  # a snapshot from before the erasure
        erased = replace(
            stored,
            versions=(
                replace(versions[0], wrapped_material=b"", destroy_at=now, destroyed_at=now),
                versions[1],
            ),
        )
        started = time.monotonic()
        assert store.update_version_states(erased, stored.revision)
        assert time.monotonic() - started < 10  # not the 30 s busy timeout
        assert material in wal.read_bytes()  # what the reader's snapshot still needs
        assert store.keys_due_for_destruction(now, 10) == [("t", key.key_id)]
    finally:
        reader.execute("COMMIT")
        reader.close()
    again = store.get_key("t", key.key_id)  # the next pass writes the key again
    assert again is not None and store.update_version_states(again, again.revision)
    assert store.keys_due_for_destruction(now, 10) == []
    assert not wal.exists() or material not in wal.read_bytes()
    assert material not in store.path.read_bytes()
    store.close()


def test_the_health_probe_writes_new_pages_to_the_log_and_never_grows_the_database(tmp_path: Path) -> None:
    """Issue 22, item 4: the probe rewrote one small row, which fit in blocks the write-ahead log already held, so
    a full disk went unseen. It must need what a write needs (new pages in the log), and it runs every
    CRYPTO_HEALTH_INTERVAL for the life of the server: the file must not grow with it."""
    store = SqliteKeyStore(tmp_path)
    wal = store.path.with_name(store.path.name + "-wal")

    def pages() -> int:
        with contextlib.closing(sqlite3.connect(store.path)) as db:
            count: int = db.execute("PRAGMA page_count").fetchone()[0]
            return count

    store.ping()
    after_the_first = pages()
    appended = []
    for _ in range(50):
        before = wal.stat().st_size
        store.ping()
        appended.append(wal.stat().st_size - before)
    assert min(appended) >= 4 * 4096, appended
    assert pages() == after_the_first
    store.close()


_READ_ONLY_WAL_INDEX = """
import sqlite3, subprocess, sys
from pathlib import Path
from crypto_server.domain.errors import StoreUnavailable
from crypto_server.storage.sqlite import SqliteKeyStore

store = SqliteKeyStore(Path(sys.argv[1]))
shm = str(store.path) + "-shm"
other = sqlite3.connect(store.path, isolation_level=None)


def attempt(what, call):
    try:
        call()
        print(what, "ok", flush=True)
    except StoreUnavailable as error:  # StoreWriteRefused included
        print(what, type(error).__name__, flush=True)


def read_only(on):
    subprocess.run(["chattr", "+i" if on else "-i", shm], check=True)


store.replace_meta("a", b"1")
other.execute("INSERT INTO store_meta VALUES ('b', x'00')")  # a commit no read has marked
read_only(True)
attempt("read", lambda: store.get_meta("a"))
attempt("write", lambda: store.replace_meta("c", b""))
attempt("probe", store.ping)
read_only(False)
other.execute("SELECT 1 FROM store_meta").fetchall()  # a read, which leaves a read mark at that commit
read_only(True)
attempt("read", lambda: store.get_meta("a"))
attempt("write", lambda: store.replace_meta("c", b""))
read_only(False)
attempt("write", lambda: store.replace_meta("c", b""))
store.close()
"""


def test_a_read_only_wal_index_refuses_writes_and_the_reads_that_would_write_into_it(tmp_path: Path) -> None:
    """Issue 22, item 5: SQLite maps the -shm file into memory and writes it, readers too when no read mark stands
    at the last commit; a write into it once it is read-only is SIGBUS. In a child process, which that would kill."""
    probe = subprocess.run(["chattr", "+i", str(tmp_path)], capture_output=True, check=False)
    if probe.returncode != 0:
        pytest.skip(f"chattr +i is not available here (needs root): {probe.stderr.decode().strip()}")
    subprocess.run(["chattr", "-i", str(tmp_path)], check=True)
    try:
        child = subprocess.run(
            [sys.executable, "-c", _READ_ONLY_WAL_INDEX, str(tmp_path / "data")],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:  # a child that died midway left the file immutable
        subprocess.run(["chattr", "-i", str(tmp_path / "data" / "keys.sqlite3-shm")], capture_output=True, check=False)
    assert child.returncode == 0, (child.returncode, child.stdout, child.stderr)
    assert child.stdout.splitlines() == [
        "read StoreUnavailable",  # no read mark at the last commit: the read would write one
        "write StoreWriteRefused",
        "probe StoreWriteRefused",
        "read ok",  # a read mark stands at the last commit
        "write StoreWriteRefused",
        "write ok",  # writable again: no restart, no new store
    ]
