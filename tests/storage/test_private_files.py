"""The embedded store's directory and files are private to the service's user, whatever the umask."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from crypto_server.storage.sqlite import SqliteKeyStore


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """umask 000: files and directories get exactly the mode the code asks for."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_a_fresh_store_and_its_wal_files_are_private_whatever_the_umask(tmp_path: Path, permissive_umask: None) -> None:
    data_dir = tmp_path / "data"
    store = SqliteKeyStore(data_dir)
    try:
        store.set_root_key_check(b"\0" * 28)  # a write: SQLite creates its -wal and -shm files
        files = sorted(data_dir.iterdir())
        assert [path.name for path in files] == ["keys.sqlite3", "keys.sqlite3-shm", "keys.sqlite3-wal"]
        assert {path.name: _mode(path) for path in files} == dict.fromkeys((path.name for path in files), 0o600)
        assert _mode(data_dir) == 0o700
    finally:
        store.close()


def test_a_store_left_readable_by_others_is_tightened_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "keys.sqlite3").touch()
    (data_dir / "keys.sqlite3-wal").touch()
    for path in (data_dir, data_dir / "keys.sqlite3", data_dir / "keys.sqlite3-wal"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # as an earlier version created them under umask 022
    with caplog.at_level(logging.WARNING):
        SqliteKeyStore(data_dir).close()
    assert _mode(data_dir) == 0o700
    assert _mode(data_dir / "keys.sqlite3") == 0o600
    warned = {record.__dict__["path"] for record in caplog.records if record.levelno == logging.WARNING}
    assert warned == {str(data_dir), str(data_dir / "keys.sqlite3"), str(data_dir / "keys.sqlite3-wal")}
