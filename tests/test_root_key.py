"""Where the root key comes from: a private file, a variable (warned about), or a generated development key."""

from __future__ import annotations

import base64
import logging
import os
import stat
from pathlib import Path

import pytest

from crypto_server.config import ConfigError, Settings
from crypto_server.domain.key_wrap import root_key_fingerprint
from crypto_server.root_key import _open_to_others, load_other_root_key, load_root_key
from tests.conftest import write_root_key_file


def _key_file(path: Path, mode: int) -> Path:
    write_root_key_file(path, base64.b64encode(os.urandom(32)).decode())
    path.chmod(mode)
    return path


# Refused whoever owns the file (group read alone is allowed for root-owned files: see below).
@pytest.mark.parametrize("mode", [0o644, 0o604, 0o660, 0o620])
def test_root_key_files_open_to_other_users_are_refused(tmp_path: Path, mode: int) -> None:
    root = _key_file(tmp_path / "root.key", mode)
    other = _key_file(tmp_path / "other.key", mode)
    with pytest.raises(ConfigError, match=r"CRYPTO_ROOT_KEY_FILE .* is open to other users"):
        load_root_key(Settings(root_key_file=root))
    with pytest.raises(ConfigError, match=r"CRYPTO_OTHER_ROOT_KEY_FILE .* is open to other users"):
        load_other_root_key(Settings(root_key_file=root, other_root_key_file=other))


def test_an_open_root_key_file_is_accepted_with_a_warning_when_allowed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = _key_file(tmp_path / "root.key", 0o644)
    with caplog.at_level(logging.WARNING):
        loaded = load_root_key(Settings(root_key_file=root, allow_insecure=True))
    assert loaded.fingerprint == root_key_fingerprint(base64.b64decode(root.read_text()))
    assert any("CRYPTO_ALLOW_INSECURE" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    ("uid", "mode", "open_to_others"),
    [
        (1000, 0o600, False),
        (1000, 0o400, False),
        (1000, 0o640, True),
        (1000, 0o644, True),
        (0, 0o440, False),  # a Kubernetes Secret volume with an fsGroup: root:<fsGroup> 0440
        (0, 0o640, False),
        (0, 0o660, True),
        (0, 0o644, True),
    ],
)
def test_only_a_root_owned_file_may_also_be_group_readable(uid: int, mode: int, open_to_others: bool) -> None:
    status = os.stat_result((stat.S_IFREG | mode, 0, 0, 1, uid, 0, 45, 0, 0, 0))
    assert _open_to_others(status) is open_to_others


def test_the_root_key_variable_is_warned_about_and_leaves_the_environment(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv("CRYPTO_ROOT_KEY", key)
    settings = Settings.from_env()
    assert "CRYPTO_ROOT_KEY" not in os.environ, "a child process must not inherit the root key"
    with caplog.at_level(logging.WARNING):
        assert load_root_key(settings).fingerprint == root_key_fingerprint(base64.b64decode(key))
    assert [r.getMessage() for r in caplog.records if "CRYPTO_ROOT_KEY_FILE in production" in r.getMessage()]
    assert key not in caplog.text


def test_a_generated_development_key_left_open_is_tightened(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = load_root_key(settings)
    (tmp_path / "data" / "root.key").chmod(0o644)
    assert load_root_key(settings).fingerprint == first.fingerprint
    assert stat.S_IMODE((tmp_path / "data" / "root.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700
