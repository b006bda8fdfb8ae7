"""Root key rotation without downtime: unwrap under either root key, re-wrap, retire the old one.

`crypto-rewrap-root` refuses, before writing anything, every mistake that would re-wrap the keys away from the
key the replicas use: the two variables swapped, an old key that is not the store's, the same key twice, a store
without a check value, and (without --yes or a confirmation) a new key nobody checked.
"""

from __future__ import annotations

import base64
import io
import json
import os
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.app import open_key_store
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.key_wrap import UnwrapFailed, root_key_fingerprint
from crypto_server.rewrap_root import main
from crypto_server.service.keyring import unwrap_version
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import FILE_ROOT_BACKENDS, ServerHandle, StartServer, write_root_key_file
from tests.servers import SoftHsm

_STORE_VARIABLES = ("CRYPTO_", "MONGODB_", "REDIS_")


@dataclass(frozen=True)
class ToolRun:
    code: int
    stdout: str
    stderr: str

    def report(self) -> dict[str, object]:
        report: dict[str, object] = json.loads(self.stdout)
        return report


RunTool = Callable[..., ToolRun]


class _Terminal(io.StringIO):
    """stdin as an operator's terminal, holding what they type."""

    def isatty(self) -> bool:
        return True


def _tool_env(settings: Settings, *, new: Path | None, old: Path | None) -> dict[str, str]:
    """The tool's environment: the replicas' store settings, with the two root key files (None: set the HSM's
    variables instead)."""
    env = {"CRYPTO_DATA_DIR": str(settings.data_dir)}
    if new is not None:
        env["CRYPTO_ROOT_KEY_FILE"] = str(new)
    if old is not None:
        env["CRYPTO_OTHER_ROOT_KEY_FILE"] = str(old)
    if settings.mongodb_uri:
        env.update(MONGODB_URI=settings.mongodb_uri, MONGODB_DATABASE=settings.mongodb_database)
    if settings.redis_url:
        env["REDIS_URL"] = settings.redis_url
    return env


@pytest.fixture
def run_tool(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> RunTool:
    """Run `crypto-rewrap-root` in this process with exactly `env`; `typed` is what a terminal user types."""

    def run(env: dict[str, str], *args: str, typed: str | None = None) -> ToolRun:
        for name in list(os.environ):
            if name.startswith(_STORE_VARIABLES):
                monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.setattr(sys, "stdin", io.StringIO("") if typed is None else _Terminal(typed))
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return ToolRun(code, out, err)

    return run


def _store_state(settings: Settings) -> tuple[bytes | None, list[tuple[str, int, bytes]], bytes | None]:
    """Everything the tool could write: the check value, every master key version's wrapping, the SQLite file."""
    store = open_key_store(settings)
    try:
        check = store.database.get_root_key_check()
        versions = sorted(
            (key.key_id, v.version, v.wrapped_material) for key in store.database.master_keys() for v in key.versions
        )
    finally:
        store.close()
    database = settings.data_dir / SqliteKeyStore.FILE_NAME
    return check, versions, None if settings.mongodb_uri else database.read_bytes()


def _new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


@dataclass(frozen=True)
class Rotation:
    """A store whose two tenants' master keys are under the old root key, and the files of both root keys."""

    settings: Settings
    old: Path
    new: Path
    start_server: StartServer

    def add_tenant_under_the_new_key(self) -> None:
        """Step 2: a replica with the new root key creates a tenant, wrapping its master key under the new key."""
        both = self.start_server(root_key=None, root_key_file=self.new, other_root_key_file=self.old)
        both.create_key("t3")
        both.stop()


@pytest.fixture
def rotation(start_server: StartServer, root_key: str, tmp_path: Path) -> Rotation:
    first = start_server()
    for tenant in ("t1", "t2"):
        first.create_key(tenant)
    first.stop()
    old = write_root_key_file(tmp_path / "old.key", root_key)
    new = write_root_key_file(tmp_path / "new.key", _new_key())
    return Rotation(first.settings, old=old, new=new, start_server=start_server)


@pytest.mark.parametrize("backend", FILE_ROOT_BACKENDS)
def test_rotating_the_root_key_keeps_every_key_and_ciphertext(
    start_server: StartServer, root_key: str, tmp_path: Path, run_tool: RunTool
) -> None:
    new_key = _new_key()
    old_file = write_root_key_file(tmp_path / "old.key", root_key)
    new_file = write_root_key_file(tmp_path / "new.key", new_key)

    first = start_server()  # the old root key
    sealed = []
    for tenant in ("t1", "t2"):
        key = first.create_key(tenant)
        sealed.append((tenant, first.encrypt(tenant, key.key_id, b"secret of " + tenant.encode()).ciphertext))
    master = first.keys.ListKeys(key_pb.ListKeysRequest(tenant_id="t1", key_type=resources_pb2.KEY_TYPE_MASTER))
    first.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=master.keys[0].key_id))
    first.stop()

    # Step 2: the new root key wraps, the old one still unwraps.
    both = start_server(root_key=None, root_key_file=new_file, other_root_key_file=old_file)
    for tenant, ciphertext in sealed:
        assert both.decrypt(tenant, ciphertext).plaintext == b"secret of " + tenant.encode()
    t3 = both.create_key("t3")  # a new tenant: its master key is wrapped under the new root key
    sealed.append(("t3", both.encrypt("t3", t3.key_id, b"secret of t3").ciphertext))
    settings = both.settings
    both.stop()

    # Step 3: re-wrap, as an operator runs it.
    env = _tool_env(settings, new=new_file, old=old_file)
    done = run_tool(env, "--yes")
    assert done.code == 0, done.stderr
    assert done.report()["master_key_versions"] == {"rewrapped": 3, "already_rewrapped": 1}
    assert done.report()["metadata_key"] == {"rewrapped": 1, "already_rewrapped": 0}
    assert done.report()["new_root_key"] == root_key_fingerprint(base64.b64decode(new_key))
    state = _store_state(settings)
    again = run_tool(env, "--yes")
    assert again.code == 2 and "completed already" in again.stderr, "a second run finds the store moved on"
    assert _store_state(settings) == state
    store = open_key_store(settings)
    try:
        for master_key in store.database.master_keys():
            for record in master_key.versions:
                with pytest.raises(UnwrapFailed):
                    unwrap_version(AESGCM(base64.b64decode(root_key)), master_key, record)
    finally:
        store.close()

    # Step 4: the new root key alone; the old one is refused.
    only_new = start_server(root_key=None, root_key_file=new_file)
    for tenant, ciphertext in sealed:
        assert only_new.decrypt(tenant, ciphertext).plaintext == b"secret of " + tenant.encode()
    only_new.create_key("t1")
    only_new.stop()
    with pytest.raises(ConfigError, match="root key is not the one"):
        start_server()


@pytest.mark.parametrize("backend", FILE_ROOT_BACKENDS)
def test_moving_the_root_key_into_an_hsm_and_back_keeps_every_ciphertext(
    start_server: StartServer, softhsm: SoftHsm, tmp_path: Path, run_tool: RunTool
) -> None:
    """File -> HSM -> file, each move the rotation procedure with one side in the token; no server restart
    is needed beyond the rolling restarts of the procedure, and nothing is ever undecryptable."""
    hsm = softhsm.settings()
    hsm_env = {name: value for name, value in softhsm.env().items() if name != "SOFTHSM2_CONF"}
    file_root = start_server()
    sealed: list[tuple[str, bytes]] = []

    def seal(server: ServerHandle, tenant: str) -> None:
        key = server.create_key(tenant)
        sealed.append((tenant, server.encrypt(tenant, key.key_id, b"secret of " + tenant.encode()).ciphertext))

    def all_decrypt(server: ServerHandle) -> None:
        for tenant, ciphertext in sealed:
            assert server.decrypt(tenant, ciphertext).plaintext == b"secret of " + tenant.encode()

    seal(file_root, "t1")
    seal(file_root, "t2")
    settings = file_root.settings
    file_root.stop()
    assert settings.root_key is not None
    old_file = write_root_key_file(tmp_path / "old.key", settings.root_key)

    # Into the HSM. Step 2: the HSM key wraps, the old file key still unwraps.
    into = start_server(root_key=None, other_root_key_file=old_file, **hsm)
    all_decrypt(into)
    seal(into, "t3")
    into.stop()
    # Step 3: re-wrap everything under the HSM key.
    done = run_tool({**_tool_env(settings, new=None, old=old_file), **hsm_env}, "--yes")
    assert done.code == 0, done.stderr
    assert done.report()["master_key_versions"] == {"rewrapped": 2, "already_rewrapped": 1}
    assert done.report()["metadata_key"] == {"rewrapped": 1, "already_rewrapped": 0}
    assert done.report()["old_root_key"] == root_key_fingerprint(base64.b64decode(settings.root_key))
    # Step 4: the HSM alone; the old file key no longer opens anything.
    in_hsm = start_server(root_key=None, **hsm)
    all_decrypt(in_hsm)
    seal(in_hsm, "t4")
    hsm_fingerprint = in_hsm.running.keyring.root.fingerprint  # type: ignore[attr-defined]
    in_hsm.stop()
    assert done.report()["new_root_key"] == hsm_fingerprint
    with pytest.raises(ConfigError, match="root key is not the one"):
        start_server()

    # And back out, to a file key (disaster recovery): the HSM key is now the other root key.
    back_file = write_root_key_file(tmp_path / "back.key", _new_key())
    out_of = start_server(
        root_key=None,
        root_key_file=back_file,
        **{**hsm, "root_key_provider": "file", "pkcs11_key_label": None, "pkcs11_other_key_label": SoftHsm.ROOT_LABEL},
    )
    all_decrypt(out_of)
    seal(out_of, "t5")
    out_of.stop()
    out_env = {name: value for name, value in hsm_env.items() if name != "CRYPTO_ROOT_KEY_PROVIDER"}
    out_env["CRYPTO_PKCS11_OTHER_KEY_LABEL"] = out_env.pop("CRYPTO_PKCS11_KEY_LABEL")
    back = run_tool({**_tool_env(settings, new=back_file, old=None), **out_env}, "--yes")
    assert back.code == 0, back.stderr
    assert back.report()["master_key_versions"] == {"rewrapped": 4, "already_rewrapped": 1}
    assert back.report()["old_root_key"] == hsm_fingerprint
    on_file = start_server(root_key=None, root_key_file=back_file)
    all_decrypt(on_file)
    on_file.stop()
    with pytest.raises(ConfigError, match="root key is not the one"):
        start_server(root_key=None, **hsm)


SAFETY_BACKEND = pytest.mark.parametrize("backend", ["embedded"])


@SAFETY_BACKEND
def test_swapped_variables_are_refused_in_one_line_and_change_nothing(rotation: Rotation) -> None:
    before = _store_state(rotation.settings)
    env = _tool_env(rotation.settings, new=rotation.old, old=rotation.new)  # swapped
    process = subprocess.run(
        [sys.executable, "-m", "crypto_server.rewrap_root", "--yes"],
        env={name: value for name, value in os.environ.items() if not name.startswith(_STORE_VARIABLES)} | env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 2
    assert process.stderr.count("\n") == 1 and "Traceback" not in process.stderr
    assert "variables are swapped" in process.stderr
    assert _store_state(rotation.settings) == before


@SAFETY_BACKEND
def test_an_old_key_that_is_not_the_stores_is_refused(rotation: Rotation, tmp_path: Path, run_tool: RunTool) -> None:
    before = _store_state(rotation.settings)
    stranger = write_root_key_file(tmp_path / "stranger.key", _new_key())
    refused = run_tool(_tool_env(rotation.settings, new=rotation.new, old=stranger), "--yes")
    assert refused.code == 2
    assert "is not the store's root key" in refused.stderr
    assert _store_state(rotation.settings) == before


@SAFETY_BACKEND
def test_the_same_key_as_old_and_new_is_refused(rotation: Rotation, run_tool: RunTool) -> None:
    before = _store_state(rotation.settings)
    refused = run_tool(_tool_env(rotation.settings, new=rotation.old, old=rotation.old), "--yes")
    assert refused.code == 2
    assert "hold the same key" in refused.stderr
    assert _store_state(rotation.settings) == before


@SAFETY_BACKEND
def test_a_store_with_keys_but_no_check_value_is_refused(rotation: Rotation, run_tool: RunTool) -> None:
    with sqlite3.connect(rotation.settings.data_dir / SqliteKeyStore.FILE_NAME) as db:
        db.execute("DELETE FROM store_meta WHERE name = 'root_key_check'")
    db.close()
    before = _store_state(rotation.settings)
    refused = run_tool(_tool_env(rotation.settings, new=rotation.new, old=rotation.old), "--yes")
    assert refused.code == 2
    assert "no root key check value" in refused.stderr
    assert _store_state(rotation.settings) == before


@SAFETY_BACKEND
def test_a_fresh_random_new_key_is_not_written_without_yes(
    rotation: Rotation, tmp_path: Path, run_tool: RunTool
) -> None:
    before = _store_state(rotation.settings)
    fresh = write_root_key_file(tmp_path / "fresh.key", _new_key())  # not the key the replicas use
    refused = run_tool(_tool_env(rotation.settings, new=fresh, old=rotation.old))
    assert refused.code == 2
    assert "needs --yes" in refused.stderr
    assert _store_state(rotation.settings) == before


@SAFETY_BACKEND
def test_a_new_key_other_than_the_replicas_is_refused_even_with_yes(
    rotation: Rotation, tmp_path: Path, run_tool: RunTool
) -> None:
    rotation.add_tenant_under_the_new_key()
    before = _store_state(rotation.settings)
    fresh = write_root_key_file(tmp_path / "fresh.key", _new_key())
    refused = run_tool(_tool_env(rotation.settings, new=fresh, old=rotation.old), "--yes")
    assert refused.code == 2
    assert "opens under neither root key" in refused.stderr and "not the new key" in refused.stderr
    assert _store_state(rotation.settings) == before


@SAFETY_BACKEND
def test_dry_run_reports_what_would_change_and_writes_nothing(rotation: Rotation, run_tool: RunTool) -> None:
    rotation.add_tenant_under_the_new_key()
    before = _store_state(rotation.settings)
    dry = run_tool(_tool_env(rotation.settings, new=rotation.new, old=rotation.old), "--dry-run")
    assert dry.code == 0, dry.stderr
    assert dry.report() == {
        "dry_run": True,
        "old_root_key": root_key_fingerprint(base64.b64decode(rotation.old.read_text())),
        "new_root_key": root_key_fingerprint(base64.b64decode(rotation.new.read_text())),
        "master_key_versions": {"rewrapped": 2, "already_rewrapped": 1},
        "metadata_key": {"rewrapped": 1, "already_rewrapped": 0},
    }
    assert _store_state(rotation.settings) == before


@SAFETY_BACKEND
def test_at_a_terminal_only_typing_yes_writes(rotation: Rotation, run_tool: RunTool) -> None:
    rotation.add_tenant_under_the_new_key()
    before = _store_state(rotation.settings)
    env = _tool_env(rotation.settings, new=rotation.new, old=rotation.old)
    declined = run_tool(env, typed="y\n")
    assert declined.code == 2 and "not confirmed" in declined.stderr
    assert root_key_fingerprint(base64.b64decode(rotation.new.read_text())) in declined.stderr, "shown before asking"
    assert _store_state(rotation.settings) == before
    confirmed = run_tool(env, typed="yes\n")
    assert confirmed.code == 0, confirmed.stderr
    assert confirmed.report()["master_key_versions"] == {"rewrapped": 2, "already_rewrapped": 1}


def test_an_empty_store_has_nothing_to_rewrap(tmp_path: Path, run_tool: RunTool) -> None:
    old = write_root_key_file(tmp_path / "old.key", _new_key())
    new = write_root_key_file(tmp_path / "new.key", _new_key())
    done = run_tool(_tool_env(Settings(data_dir=tmp_path / "data"), new=new, old=old))
    assert done.code == 0
    assert "nothing to re-wrap" in done.stderr


def test_help_explains_the_exit_codes_and_exits_0() -> None:
    process = subprocess.run(
        [sys.executable, "-m", "crypto_server.rewrap_root", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 0
    assert "--dry-run" in process.stdout and "exit codes" in process.stdout


def test_the_other_root_key_needs_a_root_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CRYPTO_OTHER_ROOT_KEY_FILE"):
        Settings.from_env({"CRYPTO_OTHER_ROOT_KEY_FILE": str(tmp_path / "x")})
