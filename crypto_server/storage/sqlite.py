"""The embedded key store: one SQLite file, safe under the threaded server.

Each thread gets its own connection (SQLite connections are not shared across
threads); WAL mode lets readers proceed while one writer writes, and
`synchronous=FULL` makes every committed key durable across a crash. Writes
that read-then-write (adding a version) run in `BEGIN IMMEDIATE`, so they are
serialised across threads and processes sharing the file.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.errors import StoreUnavailable, StoreWriteRefused
from crypto_server.domain.keys import KEY_STATE_RULE, Key, KeyPolicy, KeyState, KeyType, KeyVersion, state_condition
from crypto_server.storage.port import (
    GIVE_BACK_IDS_KEPT,
    DuplicateKeyId,
    DuplicateMasterKey,
    KeyChange,
    KeyCounts,
    KeyQuery,
    Reservation,
    VersionRef,
    stored_encryption_count,
)
from crypto_server.storage.private_files import ensure_private_directory, ensure_private_file, restrict_to_owner

# Keys per read of latest_changes (one `IN` on the primary key; below SQLite's limit on parameters).
_LATEST_CHANGES_BATCH = 500

_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    key_id             TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL,
    key_type           TEXT NOT NULL,
    disabled           INTEGER NOT NULL,
    primary_version    INTEGER NOT NULL,
    primary_expires_us INTEGER,
    created_us         INTEGER NOT NULL,
    expire_after_us    INTEGER,
    rotation_period_us INTEGER,
    labels             TEXT NOT NULL,
    parent_key_id      TEXT,
    revision           INTEGER NOT NULL DEFAULT 0,
    algorithm          TEXT NOT NULL DEFAULT 'AES_256_GCM',
    integrity_tag      BLOB NOT NULL DEFAULT x'',
    -- When the row was last written (the writer's wall clock): the change feed other processes poll.
    changed_us         INTEGER NOT NULL DEFAULT 0,
    -- Key.next_rotation_at (NULL: never), outside the integrity tag: the rotator's index, re-checked per key.
    next_rotation_us   INTEGER
);
CREATE UNIQUE INDEX IF NOT EXISTS one_master_key_per_tenant ON keys (tenant_id) WHERE key_type = 'MASTER';
CREATE INDEX IF NOT EXISTS keys_by_tenant_created ON keys (tenant_id, created_us, key_id);
CREATE TABLE IF NOT EXISTS key_versions (
    key_id           TEXT NOT NULL REFERENCES keys (key_id),
    version          INTEGER NOT NULL,
    created_us       INTEGER NOT NULL,
    expires_us       INTEGER,
    parent_version   INTEGER NOT NULL,
    wrapped_material BLOB NOT NULL,
    request_id       TEXT,
    -- Encryptions made with the version (service/usage_budget.py), outside the integrity tag.
    encryptions      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, version),
    UNIQUE (key_id, request_id)
);
CREATE TABLE IF NOT EXISTS leases (
    name       TEXT PRIMARY KEY,
    holder     TEXT NOT NULL,
    expires_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS store_meta (
    name  TEXT PRIMARY KEY,
    value BLOB NOT NULL
);
"""
_KEY_COLUMNS = (
    "key_id, tenant_id, key_type, disabled, primary_version, created_us, expire_after_us, rotation_period_us, "
    "labels, parent_key_id, revision, algorithm, integrity_tag, min_decryption_version"
)
# Columns added after the first release, with what an older file gets when it is opened.
# A file from before automatic rotation gets 0 ("look at it now"): the rotator reads each such key and stores
# its real next rotation time (reschedule_rotation).
_ADDED_COLUMNS = {
    "integrity_tag": "BLOB NOT NULL DEFAULT x''",
    "changed_us": "INTEGER NOT NULL DEFAULT 0",
    "next_rotation_us": "INTEGER DEFAULT 0",
    # Version states (domain/key_destruction.py); next_destruction_us is Key.next_destruction_at, the
    # destruction pass's index, outside the integrity tag.
    "min_decryption_version": "INTEGER NOT NULL DEFAULT 0",
    "next_destruction_us": "INTEGER",
}
_ADDED_VERSION_COLUMNS = {
    "encryptions": "INTEGER NOT NULL DEFAULT 0",
    "disabled": "INTEGER NOT NULL DEFAULT 0",
    "destroy_us": "INTEGER",
    "destroyed_us": "INTEGER",
    # The version's own tag (domain/key_integrity.py); empty on a version written before versions had one.
    "integrity_tag": "BLOB NOT NULL DEFAULT x''",
    # The ids of the last give-backs of unused reservations applied to `encryptions`, space-separated
    # (UsageCounters.give_back_encryptions): a give-back repeated after an unknown outcome is applied once.
    "given_back": "TEXT NOT NULL DEFAULT ''",
}
_VERSION_COLUMNS = (
    "key_id, version, created_us, expires_us, parent_version, wrapped_material, request_id, encryptions, disabled, "
    "destroy_us, destroyed_us, integrity_tag"
)
# The versions a key always holds besides its primary (KeyVersion.has_state), found through their own index.
_HAS_STATE = "(disabled != 0 OR destroy_us IS NOT NULL OR destroyed_us IS NOT NULL)"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# How long the checkpoint that empties the write-ahead log after an erasure waits for readers (this server's own
# reads take milliseconds). A reader holding a snapshot longer (a running `.backup`) makes it incomplete: the key
# stays due and the next destruction pass tries again, instead of stalling the pass for the busy timeout.
_CHECKPOINT_WAIT_MS = 100
# The health probe's write: a blob of four pages, inserted and deleted in one transaction on a connection with
# secure_delete, so that the commit appends seven pages to the write-ahead log, about as many as a key write. (A small
# row rewritten in place fit in blocks the log already held: a full disk went unseen.) Its pages stay on the
# free list and the next probe takes them again: the file grows by four pages once, never more.
_PROBE_BLOB_BYTES = 4 * 4096
# Writes are refused, and the probe fails, once the store's file system has less than this free. The log writes
# again from its start after a checkpoint, into blocks it already holds, so writes can go on succeeding for a while
# on a full disk and fail later (and the audit trail, by default beside the store, fails at once): a margin both
# the probe and every write check keeps health and writes in agreement, and leaves SQLite the room a checkpoint
# takes to grow the database file.
_MIN_FREE_BYTES = 1 << 20
# The -shm file is the write-ahead log's index, which every connection maps into memory and writes to, readers too
# (https://www.sqlite.org/walformat.html). Made read-only while mapped (chattr +i, or a file mode for a server not
# running as root), a write into that memory is a SIGBUS, which ends the process: SQLite never sees an error. So no
# call lets SQLite at the store until the file is checked (_wal_index_refusal). The file's first 120 bytes: two
# copies of the index header (mxFrame, the last commit's frame, at offset 16; isInit at 12; a checksum of the
# first 40 bytes at 40), then nBackfill (frames copied into the database) and the five read marks.
_WAL_INDEX_BYTES = 120
_U32 = 0xFFFFFFFF

log = logging.getLogger(__name__)


def _to_us(moment: datetime) -> int:
    return (moment - _EPOCH) // timedelta(microseconds=1)


def _now_us() -> int:
    # Bookkeeping for the change feed: real time, not the service's (injectable) clock.
    return time.time_ns() // 1000


def _from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)


def _opt_to_us(moment: datetime | None) -> int | None:
    return None if moment is None else _to_us(moment)


def _opt_duration_us(duration: timedelta | None) -> int | None:
    return None if duration is None else duration // timedelta(microseconds=1)


def _opt_duration(us: int | None) -> timedelta | None:
    return None if us is None else timedelta(microseconds=us)


def _state_sql(state: KeyState, now_us: int) -> tuple[str, list[Any]]:
    """domain/keys.py KEY_STATE_RULE's condition for `state` as a WHERE clause over `keys` (and its values):
    the only place this store spells out a key's effective state."""
    condition = state_condition(state)
    clauses: list[str] = []
    params: list[Any] = []
    if condition.disabled is not None:
        clauses.append("disabled = 1" if condition.disabled else "disabled = 0")
    if condition.primary_expired is True:
        clauses.append("(primary_expires_us IS NOT NULL AND primary_expires_us <= ?)")
        params.append(now_us)
    elif condition.primary_expired is False:
        clauses.append("(primary_expires_us IS NULL OR primary_expires_us > ?)")
        params.append(now_us)
    return " AND ".join(clauses) or "1", params


class SqliteKeyStore:
    """KeyStore over a SQLite file (see storage/port.py for the contract)."""

    FILE_NAME = "keys.sqlite3"

    def __init__(self, data_dir: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = data_dir / self.FILE_NAME
        self._wal_index = self.path.with_name(self.path.name + "-shm")
        try:
            ensure_private_directory(data_dir)
            # Created 0600 before SQLite opens it: SQLite gives its -wal, -shm and -journal files the
            # database file's mode, so they are private too. Ones left by an earlier run are tightened.
            ensure_private_file(self.path)
            for suffix in ("-wal", "-shm", "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    restrict_to_owner(self.path.with_name(self.path.name + suffix))
        except OSError as error:
            raise StoreUnavailable(f"cannot open the embedded key store at {self.path}: {error.strerror}") from error
        self._busy_timeout_s = busy_timeout_s
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        # Connections given up while the -shm file was not writable: closing the last one checkpoints the log,
        # which writes into that file. Closed once it is writable again.
        self._parked: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        # Bumped on every failure and on every recovery the health probe sees: a connection opened before
        # is replaced on its next use (one opened while the file was read-only stays read-only for life).
        self._generation = 0
        self._probe_failing = False
        # Blocks a file system reserves for root (ext4: 5 %) are free to a server running as root.
        self._privileged = os.geteuid() == 0
        try:
            self._connection().executescript(_SCHEMA)
            self._add_missing_columns()
        except sqlite3.Error as error:
            raise StoreUnavailable(f"cannot open the embedded key store at {self.path}: {error}") from error

    def _add_missing_columns(self) -> None:
        db = self._connection()
        present = {row[1] for row in db.execute("PRAGMA table_info(keys)")}
        for name, definition in _ADDED_COLUMNS.items():
            if name not in present:
                # Both names are this module's constants.
                db.execute(f"ALTER TABLE keys ADD COLUMN {name} {definition}")
        present = {row[1] for row in db.execute("PRAGMA table_info(key_versions)")}
        for name, definition in _ADDED_VERSION_COLUMNS.items():
            if name not in present:
                db.execute(f"ALTER TABLE key_versions ADD COLUMN {name} {definition}")
        db.execute("CREATE INDEX IF NOT EXISTS keys_by_change ON keys (changed_us)")
        db.execute("CREATE INDEX IF NOT EXISTS keys_by_next_destruction ON keys (next_destruction_us)")
        db.execute("CREATE INDEX IF NOT EXISTS keys_by_next_rotation ON keys (next_rotation_us)")
        # Only this module's constant clause is interpolated.
        db.execute(f"CREATE INDEX IF NOT EXISTS key_versions_with_state ON key_versions (key_id) WHERE {_HAS_STATE}")

    def _connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is not None and getattr(self._local, "generation", 0) != self._generation:
            self._discard_connection()
            db = None
        if db is None:
            # isolation_level=None: autocommit, transactions only where we BEGIN them.
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            # Freed space is overwritten with zeros: erased (destroyed) material leaves no copy in the file.
            db.execute("PRAGMA secure_delete=ON")
            self._local.db = db
            self._local.generation = self._generation
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _discard_connection(self) -> None:
        """Forget this thread's connection after a failure: one opened while the file was read-only (or the
        disk full) stays that way for its whole life, so the next call must open a new one."""
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            return
        self._local.db = None
        with self._connections_lock:
            self._connections = [kept for kept in self._connections if kept is not db]
            if self._wal_index_refusal(reading=False) is not None:
                self._parked.append(db)  # closed by the probe that finds the -shm file writable again
                return
        with contextlib.suppress(sqlite3.Error):
            db.close()

    def _wal_index_refusal(self, *, reading: bool) -> str | None:
        """Why SQLite must not be let at the store now, or None: the -shm file (see _WAL_INDEX_BYTES) is not
        writable, and the call would write into it. A read would not when the index says so
        (_reads_leave_wal_index_alone); a write always does. One access() call while the file is writable."""
        if os.access(self._wal_index, os.W_OK) or not os.path.exists(self._wal_index):
            return None  # a missing file SQLite creates, or fails to with an error of its own
        if reading and self._reads_leave_wal_index_alone():
            return None
        return (
            f"its write-ahead log index ({self._wal_index.name}) is not writable; SQLite writes that file "
            "through shared memory, where the fault would end the process"
        )

    def _reads_leave_wal_index_alone(self) -> bool:
        """Whether a read can begin without writing into the -shm file: the log is wholly copied into the database,
        or a read mark already stands at its last commit (a reader writes one only when none does). Read with
        read(), not through a mapping; an index a writer left half-written (the two header copies differ, or the
        checksum fails) would be rebuilt by the reader, which is a write."""
        try:
            with open(self._wal_index, "rb", buffering=0) as index:
                data = index.read(_WAL_INDEX_BYTES)
        except OSError:
            return False
        if len(data) < _WAL_INDEX_BYTES or data[:48] != data[48:96] or not data[12]:
            return False
        words = struct.unpack_from("=10I", data)
        first = second = 0
        for at in range(0, 10, 2):
            first = (first + words[at] + second) & _U32
            second = (second + words[at + 1] + first) & _U32
        if (first, second) != struct.unpack_from("=2I", data, 40):
            return False
        (last_frame,) = struct.unpack_from("=I", data, 16)
        backfilled, _, *marks = struct.unpack_from("=6I", data, 96)
        return backfilled == last_frame or last_frame in marks

    @staticmethod
    def _leave_read_mark(db: sqlite3.Connection) -> None:
        """Begin and end a read after a commit: it sets a read mark at that commit, so reads can go on without
        writing into the -shm file should it turn read-only before the next write. The commit stands whatever
        this read meets."""
        with contextlib.suppress(sqlite3.Error):
            db.execute("SELECT 1 FROM store_meta LIMIT 1").fetchall()

    def _failed(self, error: sqlite3.OperationalError, *, writing: bool = False) -> StoreUnavailable:
        self._generation += 1
        self._discard_connection()
        if writing:
            return StoreWriteRefused(f"the embedded key store cannot write: {error}")
        return StoreUnavailable(f"the embedded key store failed: {error}")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        refusal = self._wal_index_refusal(reading=True)
        if refusal is not None:
            raise StoreUnavailable(
                f"the embedded key store cannot read: {refusal}; no read mark stands for its last write"
            )
        try:
            yield self._connection()
        except sqlite3.OperationalError as error:
            raise self._failed(error) from error

    def _free_space_refusal(self) -> str | None:
        """Why the store refuses to write for want of space (less than _MIN_FREE_BYTES free), or None."""
        try:
            fs = os.statvfs(self.path.parent)
        except OSError:
            return None  # nothing to measure by: the write itself tells
        free = (fs.f_bfree if self._privileged else fs.f_bavail) * fs.f_frsize
        if free >= _MIN_FREE_BYTES:
            return None
        return f"{free} bytes free on its file system, less than the {_MIN_FREE_BYTES} it keeps in reserve"

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        refusal = self._wal_index_refusal(reading=False) or self._free_space_refusal()
        if refusal is not None:
            raise StoreWriteRefused(f"the embedded key store cannot write: {refusal}")
        try:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            self._leave_read_mark(db)
        except sqlite3.OperationalError as error:
            raise self._failed(error, writing=True) from error

    # -- reads -----------------------------------------------------------------

    @staticmethod
    def _version_from_row(row: Sequence[Any]) -> KeyVersion:
        (
            key_id,
            number,
            created_us,
            expires_us,
            parent,
            wrapped,
            request_id,
            count,
            disabled,
            destroy_us,
            destroyed_us,
            tag,
        ) = row
        return KeyVersion(
            version=number,
            created_at=_from_us(created_us),
            expires_at=None if expires_us is None else _from_us(expires_us),
            parent_version=parent,
            wrapped_material=bytes(wrapped),
            request_id=request_id,
            encryptions=stored_encryption_count(count, key_id, number),
            disabled=bool(disabled),
            destroy_at=None if destroy_us is None else _from_us(destroy_us),
            destroyed_at=None if destroyed_us is None else _from_us(destroyed_us),
            integrity_tag=bytes(tag),
        )

    def _versions_of(
        self, db: sqlite3.Connection, primaries: Mapping[str, int], *, every: bool = False
    ) -> dict[str, list[KeyVersion]]:
        """The versions each key holds (its primary and those with a state of their own; with `every`, all of
        them), up to its primary, ascending."""
        found: dict[str, dict[int, KeyVersion]] = {key_id: {} for key_id in primaries}
        if not primaries:
            return {}
        marks = ",".join("?" * len(primaries))
        key_ids: tuple[Any, ...] = tuple(primaries)
        queries: list[tuple[str, tuple[Any, ...]]]
        # Only placeholders and this module's constant clauses are interpolated; the values are bound.
        if every:
            queries = [(f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE key_id IN ({marks})", key_ids)]  # noqa: S608
        else:
            pairs = ",".join("(?, ?)" for _ in primaries)
            queries = [
                (
                    # A join, so that each (key, primary) is one primary-key lookup: `(key_id, version) IN (VALUES
                    # ...)` made SQLite search by key_id alone, through every version of the key.
                    f"SELECT {_VERSION_COLUMNS} FROM (VALUES {pairs}) AS wanted "  # noqa: S608
                    "JOIN key_versions "
                    "ON key_versions.key_id = wanted.column1 AND key_versions.version = wanted.column2",
                    tuple(value for pair in primaries.items() for value in pair),
                ),
                (f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE key_id IN ({marks}) AND {_HAS_STATE}", key_ids),  # noqa: S608
            ]
        for sql, params in queries:
            for row in db.execute(sql, params):
                if row[1] <= primaries[row[0]]:  # a version above the primary is a pending rotation
                    found[row[0]][row[1]] = self._version_from_row(row)
        return {key_id: [versions[n] for n in sorted(versions)] for key_id, versions in found.items()}

    def _keys_from_rows(self, db: sqlite3.Connection, rows: list[Any], *, every: bool = False) -> list[Key]:
        versions = self._versions_of(db, {row[0]: row[4] for row in rows}, every=every)
        return [
            Key(
                key_id=key_id,
                tenant_id=tenant_id,
                key_type=KeyType(key_type),
                disabled=bool(disabled),
                primary_version=primary_version,
                versions=tuple(versions[key_id]),
                created_at=_from_us(created_us),
                policy=KeyPolicy(_opt_duration(expire_after_us), _opt_duration(rotation_period_us)),
                labels=json.loads(labels),
                parent_key_id=parent_key_id,
                revision=revision,
                algorithm=Algorithm(algorithm),
                integrity_tag=bytes(integrity_tag),
                min_decryption_version=min_decryption_version,
            )
            for (
                key_id,
                tenant_id,
                key_type,
                disabled,
                primary_version,
                created_us,
                expire_after_us,
                rotation_period_us,
                labels,
                parent_key_id,
                revision,
                algorithm,
                integrity_tag,
                min_decryption_version,
            ) in rows
        ]

    def _select_one(self, db: sqlite3.Connection, where: str, params: tuple[Any, ...]) -> Key | None:
        # `where` is one of this module's constant clauses; the values are bound.
        rows = db.execute(f"SELECT {_KEY_COLUMNS} FROM keys WHERE {where}", params).fetchall()  # noqa: S608
        keys = self._keys_from_rows(db, rows)
        return keys[0] if keys else None

    def get_key(self, tenant_id: str, key_id: str) -> Key | None:
        with self._read() as db:
            # One snapshot for the key row and its versions.
            db.execute("BEGIN")
            try:
                return self._select_one(db, "key_id = ? AND tenant_id = ?", (key_id, tenant_id))
            finally:
                db.execute("COMMIT")

    def get_master_key(self, tenant_id: str) -> Key | None:
        with self._read() as db:
            db.execute("BEGIN")
            try:
                return self._select_one(db, "tenant_id = ? AND key_type = 'MASTER'", (tenant_id,))
            finally:
                db.execute("COMMIT")

    def list_keys(self, query: KeyQuery) -> list[Key]:
        where = ["tenant_id = ?"]
        params: list[Any] = [query.tenant_id]
        if query.key_type is not None:
            where.append("key_type = ?")
            params.append(query.key_type.value)
        if query.state is not None:
            clause, values = _state_sql(query.state, _to_us(query.now))
            where.append(clause)
            params.extend(values)
        if query.after is not None:
            # A row value: a range on keys_by_tenant_created (the OR form scanned the tenant from its first key).
            where.append("(created_us, key_id) > (?, ?)")
            params.extend((_to_us(query.after.created_at), query.after.key_id))
        # Only this method's constant clauses are joined; the values are bound.
        sql = f"SELECT {_KEY_COLUMNS} FROM keys WHERE {' AND '.join(where)} ORDER BY created_us, key_id LIMIT ?"  # noqa: S608
        params.append(query.limit)
        with self._read() as db:
            db.execute("BEGIN")
            try:
                return self._keys_from_rows(db, db.execute(sql, params).fetchall())
            finally:
                db.execute("COMMIT")

    def list_versions(self, tenant_id: str, key_id: str, after_version: int, limit: int) -> list[KeyVersion]:
        with self._read() as db:
            rows = db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE key_id = ? AND version > ? "  # noqa: S608
                "AND version <= (SELECT primary_version FROM keys WHERE key_id = ? AND tenant_id = ?) "
                "ORDER BY version LIMIT ?",
                (key_id, after_version, key_id, tenant_id, limit),
            ).fetchall()
        return [self._version_from_row(row) for row in rows]

    def version_for_request(self, tenant_id: str, key_id: str, request_id: str) -> KeyVersion | None:
        with self._read() as db:
            row = db.execute(
                f"SELECT {_VERSION_COLUMNS} FROM key_versions WHERE key_id = ? AND request_id = ? "  # noqa: S608
                "AND version <= (SELECT primary_version FROM keys WHERE key_id = ? AND tenant_id = ?)",
                (key_id, request_id, key_id, tenant_id),
            ).fetchone()
        return None if row is None else self._version_from_row(row)

    # -- writes ----------------------------------------------------------------

    @staticmethod
    def _insert_version(db: sqlite3.Connection, key_id: str, version: KeyVersion) -> None:
        db.execute(
            "INSERT INTO key_versions "
            "(key_id, version, created_us, expires_us, parent_version, wrapped_material, request_id, "
            "disabled, destroy_us, destroyed_us, integrity_tag) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                key_id,
                version.version,
                _to_us(version.created_at),
                _opt_to_us(version.expires_at),
                version.parent_version,
                version.wrapped_material,
                version.request_id,
                int(version.disabled),
                _opt_to_us(version.destroy_at),
                _opt_to_us(version.destroyed_at),
                version.integrity_tag,
            ),
        )

    def insert_key(self, key: Key) -> None:
        try:
            with self._write() as db:
                if db.execute("SELECT 1 FROM keys WHERE key_id = ?", (key.key_id,)).fetchone():
                    raise DuplicateKeyId(key.key_id)
                db.execute(
                    "INSERT INTO keys (key_id, tenant_id, key_type, disabled, primary_version, primary_expires_us, "
                    "created_us, expire_after_us, rotation_period_us, labels, parent_key_id, algorithm, integrity_tag, "
                    "changed_us, next_rotation_us, min_decryption_version, next_destruction_us) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        key.key_id,
                        key.tenant_id,
                        key.key_type.value,
                        int(key.disabled),
                        key.primary_version,
                        _opt_to_us(key.expires_at),
                        _to_us(key.created_at),
                        _opt_duration_us(key.policy.expire_after),
                        _opt_duration_us(key.policy.rotation_period),
                        json.dumps(dict(key.labels), sort_keys=True),
                        key.parent_key_id,
                        key.algorithm.value,
                        key.integrity_tag,
                        _now_us(),
                        _opt_to_us(key.next_rotation_at),
                        key.min_decryption_version,
                        _opt_to_us(key.next_destruction_at),
                    ),
                )
                for version in key.versions:
                    self._insert_version(db, key.key_id, version)
        except sqlite3.IntegrityError as error:
            if key.key_type is KeyType.MASTER:
                raise DuplicateMasterKey(key.tenant_id) from error
            raise

    def add_version(self, updated: Key, expected_revision: int) -> bool:
        version = updated.primary
        with self._write() as db:
            row = db.execute(
                "SELECT revision FROM keys WHERE key_id = ? AND tenant_id = ?", (updated.key_id, updated.tenant_id)
            ).fetchone()
            if row is None or row[0] != expected_revision:
                return False
            try:
                self._insert_version(db, updated.key_id, version)
            except sqlite3.IntegrityError:
                return False  # that number or request id exists: another writer was first
            db.execute(
                "UPDATE keys SET primary_version = ?, primary_expires_us = ?, integrity_tag = ?, "
                "revision = revision + 1, changed_us = ?, next_rotation_us = ? WHERE key_id = ?",
                (
                    version.version,
                    _opt_to_us(version.expires_at),
                    updated.integrity_tag,
                    _now_us(),
                    _opt_to_us(updated.next_rotation_at),
                    updated.key_id,
                ),
            )
            return True

    def update_key(self, updated: Key, expected_revision: int) -> bool:
        with self._write() as db:
            changed = db.execute(
                "UPDATE keys SET disabled = ?, expire_after_us = ?, rotation_period_us = ?, labels = ?, "
                "integrity_tag = ?, revision = revision + 1, changed_us = ?, next_rotation_us = ?, "
                "min_decryption_version = ? WHERE key_id = ? AND tenant_id = ? AND revision = ?",
                (
                    int(updated.disabled),
                    _opt_duration_us(updated.policy.expire_after),
                    _opt_duration_us(updated.policy.rotation_period),
                    json.dumps(dict(updated.labels), sort_keys=True),
                    updated.integrity_tag,
                    _now_us(),
                    _opt_to_us(updated.next_rotation_at),
                    updated.min_decryption_version,
                    updated.key_id,
                    updated.tenant_id,
                    expected_revision,
                ),
            ).rowcount
        return changed == 1

    def update_version_states(self, updated: Key, expected_revision: int) -> bool:
        erased = 0
        with self._write() as db:  # one transaction: the states, the tag and the erasure land together
            # Set while an erasure's checkpoint is owed (_keep_due): this write tries it again.
            scheduled = db.execute(
                "SELECT next_destruction_us FROM keys WHERE key_id = ? AND tenant_id = ?",
                (updated.key_id, updated.tenant_id),
            ).fetchone()
            changed = db.execute(
                "UPDATE keys SET min_decryption_version = ?, integrity_tag = ?, revision = revision + 1, "
                "changed_us = ?, next_rotation_us = ?, next_destruction_us = ? "
                "WHERE key_id = ? AND tenant_id = ? AND revision = ?",
                (
                    updated.min_decryption_version,
                    updated.integrity_tag,
                    _now_us(),
                    _opt_to_us(updated.next_rotation_at),
                    _opt_to_us(updated.next_destruction_at),
                    updated.key_id,
                    updated.tenant_id,
                    expected_revision,
                ),
            ).rowcount
            if changed != 1:
                return False
            for version in updated.versions:
                db.execute(
                    "UPDATE key_versions SET disabled = ?, destroy_us = ?, destroyed_us = ? "
                    "WHERE key_id = ? AND version = ?",
                    (
                        int(version.disabled),
                        _opt_to_us(version.destroy_at),
                        _opt_to_us(version.destroyed_at),
                        updated.key_id,
                        version.version,
                    ),
                )
                if version.destroyed:
                    erased += db.execute(
                        "UPDATE key_versions SET wrapped_material = x'' WHERE key_id = ? AND version = ? "
                        "AND length(wrapped_material) > 0",
                        (updated.key_id, version.version),
                    ).rowcount
        destroyed = [v.destroyed_at for v in updated.versions if v.destroyed_at is not None]
        owed = erased or (scheduled is not None and scheduled[0] is not None)
        if destroyed and owed and not self._flush_erased_pages():
            self._keep_due(updated, min(destroyed))
        return True

    def store_tags(self, updated: Key, expected_revision: int) -> bool:
        with self._write() as db:
            changed = db.execute(
                "UPDATE keys SET integrity_tag = ?, revision = revision + 1, changed_us = ? "
                "WHERE key_id = ? AND tenant_id = ? AND revision = ?",
                (updated.integrity_tag, _now_us(), updated.key_id, updated.tenant_id, expected_revision),
            ).rowcount
            if changed != 1:
                return False
            db.executemany(
                "UPDATE key_versions SET integrity_tag = ? WHERE key_id = ? AND version = ?",
                [(v.integrity_tag, updated.key_id, v.version) for v in updated.versions],
            )
        return True

    def _flush_erased_pages(self) -> bool:
        """Move the erasure into the database file and empty the write-ahead log, whose older frames still
        hold the pages as they were (secure_delete has already zeroed the freed space in the new ones).
        Whether the log is empty now: not while a reader holds a snapshot older than the erasure.

        After the commit, on its own: PASSIVE first (copies what it can, waits for no one), then TRUNCATE,
        waiting a moment at most for readers instead of the connection's busy timeout."""
        if self._wal_index_refusal(reading=False) is not None:
            return False  # a checkpoint writes into the -shm file
        try:
            with self._read() as db:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                db.execute(f"PRAGMA busy_timeout = {_CHECKPOINT_WAIT_MS}")
                try:
                    busy, frames, checkpointed = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                finally:
                    db.execute(f"PRAGMA busy_timeout = {round(self._busy_timeout_s * 1000)}")
        except StoreUnavailable:
            return False
        return bool(busy == 0 and frames == checkpointed)

    def _keep_due(self, key: Key, due_at: datetime) -> None:
        """The erased material may still be in the write-ahead log: keep the key in the destruction index, so
        the next pass writes it again and retries the checkpoint (the index only: no revision, as a schedule)."""
        log.warning(
            "destroyed key material may remain in the SQLite write-ahead log until a checkpoint completes: a "
            "reader holds an older snapshot of the database (a running `sqlite3 .backup` or another long read); "
            "the key stays due and the next destruction pass retries",
            extra={"tenant_id": key.tenant_id, "key_id": key.key_id},
        )
        with self._write() as db:
            db.execute(
                "UPDATE keys SET next_destruction_us = ? WHERE key_id = ? AND tenant_id = ? "
                "AND (next_destruction_us IS NULL OR next_destruction_us > ?)",
                (_to_us(due_at), key.key_id, key.tenant_id, _to_us(due_at)),
            )

    def keys_due_for_destruction(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        with self._read() as db:
            rows = db.execute(
                "SELECT tenant_id, key_id FROM keys WHERE next_destruction_us IS NOT NULL "
                "AND next_destruction_us <= ? ORDER BY next_destruction_us LIMIT ?",
                (_to_us(now), limit),
            ).fetchall()
        return [(tenant_id, key_id) for tenant_id, key_id in rows]

    def pending_version(self, tenant_id: str, key_id: str, number: int) -> KeyVersion | None:
        return None  # a rotation is one transaction here: it never stops half-way

    def keys_due_for_rotation(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        with self._read() as db:
            rows = db.execute(
                "SELECT tenant_id, key_id FROM keys WHERE next_rotation_us IS NOT NULL AND next_rotation_us <= ? "
                "ORDER BY next_rotation_us LIMIT ?",
                (_to_us(now), limit),
            ).fetchall()
        return [(tenant_id, key_id) for tenant_id, key_id in rows]

    def reschedule_rotation(
        self, tenant_id: str, key_id: str, expected_revision: int, next_rotation_at: datetime | None
    ) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE keys SET next_rotation_us = ? WHERE key_id = ? AND tenant_id = ? AND revision = ?",
                (_opt_to_us(next_rotation_at), key_id, tenant_id, expected_revision),
            )

    def reserve_encryptions(self, version: VersionRef, wanted: int, limit: int) -> Reservation | None:
        with self._write() as db:  # BEGIN IMMEDIATE: no other writer, in any process, between read and write
            row = db.execute(
                "SELECT encryptions FROM key_versions WHERE key_id = ? AND version = ? "
                "AND EXISTS (SELECT 1 FROM keys WHERE keys.key_id = ? AND keys.tenant_id = ?)",
                (version.key_id, version.version, version.key_id, version.tenant_id),
            ).fetchone()
            if row is None:
                return None
            granted = min(wanted, max(0, limit - row[0]))
            if granted:
                db.execute(
                    "UPDATE key_versions SET encryptions = encryptions + ? WHERE key_id = ? AND version = ?",
                    (granted, version.key_id, version.version),
                )
            return Reservation(granted, row[0] + granted)

    def add_encryptions(self, counts: Mapping[VersionRef, int]) -> dict[VersionRef, int]:
        totals: dict[VersionRef, int] = {}
        with self._write() as db:  # one transaction: every count lands, or none
            for ref, count in counts.items():
                row = db.execute(
                    "UPDATE key_versions SET encryptions = encryptions + ? WHERE key_id = ? AND version = ? "
                    "AND EXISTS (SELECT 1 FROM keys WHERE keys.key_id = ? AND keys.tenant_id = ?) "
                    "RETURNING encryptions",
                    (count, ref.key_id, ref.version, ref.key_id, ref.tenant_id),
                ).fetchone()
                if row is not None:
                    totals[ref] = row[0]
        return totals

    def give_back_encryptions(self, give_back_id: str, counts: Mapping[VersionRef, int]) -> None:
        with self._write() as db:  # BEGIN IMMEDIATE: the id check and the subtraction see the same row
            for ref, count in counts.items():
                row = db.execute(
                    "SELECT given_back FROM key_versions WHERE key_id = ? AND version = ? "
                    "AND EXISTS (SELECT 1 FROM keys WHERE keys.key_id = ? AND keys.tenant_id = ?)",
                    (ref.key_id, ref.version, ref.key_id, ref.tenant_id),
                ).fetchone()
                if row is None:
                    continue
                applied = row[0].split()
                if give_back_id in applied:
                    continue
                db.execute(
                    "UPDATE key_versions SET encryptions = max(0, encryptions - ?), given_back = ? "
                    "WHERE key_id = ? AND version = ?",
                    (count, " ".join([*applied, give_back_id][-GIVE_BACK_IDS_KEPT:]), ref.key_id, ref.version),
                )

    def mark_rotation_due(self, version: VersionRef, now: datetime) -> None:
        with self._write() as db:
            db.execute(
                "UPDATE keys SET next_rotation_us = ? WHERE key_id = ? AND tenant_id = ? AND primary_version = ? "
                "AND (next_rotation_us IS NULL OR next_rotation_us > ?)",
                (_to_us(now), version.key_id, version.tenant_id, version.version, _to_us(now)),
            )

    def acquire_lease(self, name: str, holder: str, now: datetime, ttl: timedelta) -> bool:
        now_us = _to_us(now)
        with self._write() as db:
            row = db.execute("SELECT holder, expires_us FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > now_us:
                return False
            db.execute(
                "INSERT OR REPLACE INTO leases (name, holder, expires_us) VALUES (?, ?, ?)",
                (name, holder, _to_us(now + ttl)),
            )
            return True

    def release_lease(self, name: str, holder: str) -> None:
        with self._write() as db:
            db.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def get_meta(self, name: str) -> bytes | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM store_meta WHERE name = ?", (name,)).fetchone()
        return None if row is None else bytes(row[0])

    def add_meta(self, name: str, value: bytes) -> bytes:
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO store_meta (name, value) VALUES (?, ?)", (name, value))
            row = db.execute("SELECT value FROM store_meta WHERE name = ?", (name,)).fetchone()
        return bytes(row[0])

    def replace_meta(self, name: str, value: bytes) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO store_meta (name, value) VALUES (?, ?)", (name, value))

    def changed_keys(self, since: datetime) -> list[KeyChange]:
        with self._read() as db:
            rows = db.execute(
                "SELECT tenant_id, key_id, key_type, revision, changed_us FROM keys WHERE changed_us >= ?",
                (_to_us(since),),
            ).fetchall()
        return [
            KeyChange(tenant, key_id, KeyType(kind), revision, _from_us(us))
            for tenant, key_id, kind, revision, us in rows
        ]

    def latest_changes(self, keys: Sequence[tuple[str, str]]) -> list[KeyChange]:
        wanted = set(keys)
        ids = list(dict.fromkeys(key_id for _, key_id in keys))
        rows: list[tuple[str, str, str, int, int]] = []
        with self._read() as db:
            for start in range(0, len(ids), _LATEST_CHANGES_BATCH):
                batch = ids[start : start + _LATEST_CHANGES_BATCH]
                rows.extend(
                    db.execute(
                        "SELECT tenant_id, key_id, key_type, revision, changed_us FROM keys "  # noqa: S608
                        f"WHERE key_id IN ({','.join('?' * len(batch))})",
                        batch,
                    ).fetchall()
                )
        return [
            KeyChange(tenant, key_id, KeyType(kind), revision, _from_us(us))
            for tenant, key_id, kind, revision, us in rows
            if (tenant, key_id) in wanted
        ]

    def has_keys(self) -> bool:
        with self._read() as db:
            return db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def master_keys(self) -> Iterator[Key]:
        after = ""
        while True:
            with self._read() as db:
                rows = db.execute(
                    f"SELECT {_KEY_COLUMNS} FROM keys WHERE key_type = 'MASTER' AND key_id > ? "  # noqa: S608
                    "ORDER BY key_id LIMIT 500",
                    (after,),
                ).fetchall()
                # Every version: a root key rotation re-wraps them all.
                keys = self._keys_from_rows(db, rows, every=True)
            if not keys:
                return
            yield from keys
            after = keys[-1].key_id

    def replace_wrapped_material(self, tenant_id: str, key_id: str, version: int, old: bytes, new: bytes) -> bool:
        with self._write() as db:
            changed = db.execute(
                "UPDATE key_versions SET wrapped_material = ? WHERE key_id = ? AND version = ? "
                "AND wrapped_material = ? AND key_id IN (SELECT key_id FROM keys WHERE tenant_id = ?)",
                (new, key_id, version, old, tenant_id),
            ).rowcount
            if changed:
                db.execute(
                    "UPDATE keys SET revision = revision + 1, changed_us = ? WHERE key_id = ?", (_now_us(), key_id)
                )
            return changed == 1

    def replace_root_key_check(self, check: bytes) -> None:
        with self._write() as db:
            db.execute("INSERT OR REPLACE INTO store_meta (name, value) VALUES ('root_key_check', ?)", (check,))

    def get_root_key_check(self) -> bytes | None:
        with self._read() as db:
            row = db.execute("SELECT value FROM store_meta WHERE name = 'root_key_check'").fetchone()
        return None if row is None else bytes(row[0])

    def set_root_key_check(self, check: bytes) -> bytes:
        with self._write() as db:
            db.execute("INSERT OR IGNORE INTO store_meta (name, value) VALUES ('root_key_check', ?)", (check,))
            row = db.execute("SELECT value FROM store_meta WHERE name = 'root_key_check'").fetchone()
        return bytes(row[0])

    def key_counts(self, now: datetime) -> KeyCounts:
        cases: list[str] = []
        params: list[Any] = []
        for condition in KEY_STATE_RULE:
            clause, values = _state_sql(condition.state, _to_us(now))
            cases.append(f"WHEN {clause} THEN '{condition.state.value}'")
            params.extend(values)
        with self._read() as db:
            rows = db.execute(
                # Only _state_sql's constant clauses and KeyState names are joined; the values are bound.
                f"SELECT key_type, CASE {' '.join(cases)} END AS state, COUNT(*) FROM keys "  # noqa: S608
                "GROUP BY key_type, state",
                params,
            ).fetchall()
            (tenants,) = db.execute("SELECT COUNT(DISTINCT tenant_id) FROM keys").fetchone()
        return KeyCounts({(KeyType(kind), KeyState(state)): count for kind, state, count in rows}, tenants)

    def ping(self) -> None:
        # A write, not a read: a read-only file or a full disk must show in health, as every write fails. What a
        # write needs: the free space every write checks, then new pages in the log (_PROBE_BLOB_BYTES), which a
        # quota or a read-only file refuses. On a connection of its own, opened afresh: a connection opened
        # earlier keeps the access it had then.
        refusal = self._wal_index_refusal(reading=False) or self._free_space_refusal()
        if refusal is not None:
            self._probe_failing = True
            raise StoreWriteRefused(f"the embedded key store cannot write: {refusal}")
        try:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout_s, isolation_level=None)
        except sqlite3.OperationalError as error:
            raise StoreUnavailable(f"the embedded key store failed: {error}") from error
        try:
            db.execute("PRAGMA secure_delete=ON")  # the blob's freed pages are written too (zeroed), not skipped
            db.execute("BEGIN IMMEDIATE")
            db.execute(
                "INSERT OR REPLACE INTO store_meta (name, value) VALUES ('health_probe', zeroblob(?))",
                (_PROBE_BLOB_BYTES,),
            )
            db.execute("DELETE FROM store_meta WHERE name = 'health_probe'")
            db.execute("COMMIT")
            self._leave_read_mark(db)
        except sqlite3.OperationalError as error:
            self._probe_failing = True
            raise StoreWriteRefused(f"the embedded key store cannot write: {error}") from error
        finally:
            db.close()
        if self._probe_failing:
            # Writable again: connections opened during the failure may be read-only or broken; renew them all.
            self._probe_failing = False
            self._generation += 1
            with self._connections_lock:
                parked, self._parked = self._parked, []
            for old in parked:
                with contextlib.suppress(sqlite3.Error):
                    old.close()

    def close(self) -> None:
        with self._connections_lock:
            connections = [*self._connections, *self._parked]
            self._connections, self._parked = [], []
            if self._wal_index_refusal(reading=False) is not None:
                # Closing the last connection checkpoints the log, writing into the -shm file.
                log.warning(
                    "the embedded key store's write-ahead log index is not writable: its connections are left "
                    "open for the process's exit to release (SQLite recovers the log at the next start)"
                )
                for db in connections:
                    # Never deallocated, so never closed: the interpreter would close them on its way out.
                    ctypes.pythonapi.Py_IncRef(ctypes.py_object(db))
                return
        for db in connections:
            db.close()
