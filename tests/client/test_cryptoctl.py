"""cryptoctl, run as operators run it (a subprocess) against a real server process.

The examples of docs/cli.md are run here as written: every `console` block in a fresh shell and directory,
each command's output and exit code checked against the page, and no command may print a traceback.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from crypto_client.cli.main import parser
from tests.conftest import Launch
from tests.servers import CryptoServerProcess

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
ALL_BYTE_VALUES = bytes(range(256)) * 4 + os.urandom(1000)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # One server for the module: each test and each example uses a tenant of its own.
    directory = tmp_path_factory.mktemp("cryptoctl-server")
    process = CryptoServerProcess.launch(
        {
            "CRYPTO_HOST": "127.0.0.1",
            "CRYPTO_PORT": "0",
            "CRYPTO_DATA_DIR": str(directory / "data"),
            "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
        }
    )
    yield process
    process.terminate()


@pytest.fixture
def tenant() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def cryptoctl(
    server: CryptoServerProcess, *args: str, tenant: str = "acme", stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    result = subprocess.run(
        [str(BIN / "cryptoctl"), "--target", server.address, "--tenant", tenant, *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )
    assert b"Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) <= 1, result.stderr.decode()
    return result


def _json(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


# -- the examples of docs/cli.md -----------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    command: str
    expected: list[str]


def _examples() -> list[list[Example]]:
    blocks = re.findall(r"^```console\n(.*?)^```", (ROOT / "docs" / "cli.md").read_text(), re.M | re.S)
    parsed = []
    for block in blocks:
        examples: list[Example] = []
        for line in block.splitlines():
            if line.startswith("$ "):
                examples.append(Example(line[2:], []))
            else:
                examples[-1].expected.append(line)
        parsed.append(examples)
    return parsed


def _matches(expected: list[str], actual: str) -> bool:
    """`...` in the page stands for any text (a key id, a date, a ciphertext)."""
    pattern = ".*".join(re.escape(part) for part in "\n".join(expected).split("..."))
    lines = "\n".join(line.rstrip() for line in actual.rstrip("\n").splitlines())
    return re.fullmatch(pattern, lines, re.S) is not None


def test_the_page_has_examples_of_every_command() -> None:
    commands = " ".join(e.command for block in _examples() for e in block)
    for command in ("keys create", "keys list", "keys get", "keys rotate", "keys disable", "keys enable"):
        assert f"cryptoctl {command}" in commands or f"--json {command}" in commands
    assert "cryptoctl keys versions" in commands
    for command in ("encrypt", "decrypt", "health", "--field", "-f", "--raw", "--text", "--in", "--out"):
        assert command in commands


@pytest.mark.parametrize("number", range(len(_examples())))
def test_the_examples_in_docs_cli_md_run_as_shown(
    server: CryptoServerProcess, tenant: str, tmp_path: Path, number: int
) -> None:
    examples = _examples()[number]
    # Each command runs in braces (the current shell, so variables persist), its output and exit code kept;
    # `(exit $rc)` gives the next command the $? the page's `echo $?` shows.
    script = [f"cd {tmp_path}"]
    for index, example in enumerate(examples):
        script.append(f"{{ {example.command}\n}} >.out{index} 2>.err{index}; rc=$?; echo $rc >.rc{index}; (exit $rc)")
    env = {
        "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
        "CRYPTO_TARGET": server.address,
        "CRYPTO_TENANT": tenant,
        "LC_ALL": "C.UTF-8",
    }
    subprocess.run(["bash", "-c", "\n".join(script)], env=env, timeout=240, check=True)
    for index, example in enumerate(examples):
        out = (tmp_path / f".out{index}").read_text()
        err = (tmp_path / f".err{index}").read_text()
        code = int((tmp_path / f".rc{index}").read_text())
        where = f"docs/cli.md: $ {example.command}\n--- stdout\n{out}--- stderr\n{err}--- exit {code}"
        assert "Traceback" not in err, where
        assert len(err.splitlines()) <= 1, where
        assert _matches(example.expected, out + err), where
        if code != 0:
            # A failure the page shows must show its exit code too.
            assert index + 1 < len(examples) and examples[index + 1].command == "echo $?", where


# -- behaviour beyond the page -------------------------------------------------------------------------


def test_every_option_of_every_command_has_help_text() -> None:
    def walk(command: argparse.ArgumentParser, name: str) -> list[str]:
        missing = []
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub_name, sub in action.choices.items():
                    missing += walk(sub, f"{name} {sub_name}")
            elif not action.help:
                missing.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
        return missing

    assert walk(parser(), "cryptoctl") == []


def test_keys_schedule_and_cancel_destruction_and_toggle_versions(server: CryptoServerProcess, tenant: str) -> None:
    key_id = cryptoctl(server, "keys", "create", "-f", "key_id", tenant=tenant).stdout.decode().strip()
    refused = cryptoctl(server, "keys", "schedule-destruction", key_id, "--version", "1", tenant=tenant)
    assert refused.returncode != 0 and b"primary" in refused.stderr  # the primary, until another is
    cryptoctl(server, "keys", "rotate", key_id, tenant=tenant)

    def states(*args: str) -> list[str]:
        key = _json(cryptoctl(server, "--json", "keys", *args, tenant=tenant))
        return [version["state"] for version in key["versions"]]

    scheduled = ("schedule-destruction", key_id, "--version", "1", "--waiting-days", "2")
    assert states(*scheduled) == ["DESTROY_SCHEDULED", "ENABLED"]
    assert states("cancel-destruction", key_id, "--version", "1") == ["ENABLED", "ENABLED"]
    assert states("disable-version", key_id, "1") == ["DISABLED", "ENABLED"]
    assert states("enable-version", key_id, "1") == ["ENABLED", "ENABLED"]
    assert states("schedule-destruction", key_id) == ["DESTROY_SCHEDULED"] * 2
    assert states("cancel-destruction", key_id) == ["ENABLED"] * 2
    too_long = cryptoctl(server, "keys", "schedule-destruction", key_id, "--waiting-days", "31", tenant=tenant)
    assert too_long.returncode != 0 and b"waiting_period" in too_long.stderr


def test_global_options_work_before_and_after_the_command(server: CryptoServerProcess, tenant: str) -> None:
    created = _json(cryptoctl(server, "keys", "create", "--json", tenant=tenant))
    assert isinstance(created, dict) and created["state"] == "ENABLED"
    before = _json(cryptoctl(server, "--json", "keys", "get", created["key_id"], tenant=tenant))
    after = cryptoctl(server, "keys", "get", created["key_id"], "--field", "key_id", tenant=tenant)
    assert before["key_id"] == after.stdout.decode().strip() == created["key_id"]
    listed = _json(cryptoctl(server, "keys", "list", "--json", tenant=tenant))
    assert isinstance(listed, list) and created["key_id"] in [k["key_id"] for k in listed]
    # --tenant after the command wins over no tenant before it.
    other = subprocess.run(
        [str(BIN / "cryptoctl"), "--target", server.address, "keys", "list", "--tenant", tenant, "-f", "key_id"],
        capture_output=True,
        check=False,
        env={"PATH": str(BIN)},
    )
    assert other.returncode == 0 and created["key_id"].encode() in other.stdout


def test_binary_values_with_all_256_byte_values_round_trip(server: CryptoServerProcess, tenant: str) -> None:
    key_id = cryptoctl(server, "keys", "create", "-f", "key_id", tenant=tenant).stdout.decode().strip()
    encoded = base64.b64encode(ALL_BYTE_VALUES).decode()
    sealed = cryptoctl(server, "encrypt", "--key", key_id, "--value-base64", encoded, "-f", "ciphertext", tenant=tenant)
    ciphertext = sealed.stdout.decode().strip()
    as_base64 = cryptoctl(server, "decrypt", "--value", ciphertext, "-f", "plaintext", tenant=tenant)
    assert base64.b64decode(as_base64.stdout.strip()) == ALL_BYTE_VALUES
    raw = cryptoctl(server, "decrypt", "--value", ciphertext, "--raw", tenant=tenant)
    assert raw.returncode == 0 and raw.stdout == ALL_BYTE_VALUES
    as_text = cryptoctl(server, "decrypt", "--value", ciphertext, "--text", tenant=tenant)
    assert as_text.returncode == 4 and b"not UTF-8" in as_text.stderr and as_text.stdout == b""
    streamed = cryptoctl(server, "encrypt", "--key", key_id, stdin=ALL_BYTE_VALUES, tenant=tenant)
    opened = cryptoctl(server, "decrypt", stdin=streamed.stdout, tenant=tenant)
    assert opened.returncode == 0 and opened.stdout == ALL_BYTE_VALUES


def test_progress_shows_bytes_throughput_and_eta_on_a_terminal_only(
    server: CryptoServerProcess, tenant: str, tmp_path: Path
) -> None:
    key_id = cryptoctl(server, "keys", "create", "-f", "key_id", tenant=tenant).stdout.decode().strip()
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(8 * MIB))
    command = [str(BIN / "cryptoctl"), "--target", server.address, "--tenant", tenant, "encrypt", "--key", key_id]
    command += ["--in", str(source), "--out", str(tmp_path / "big.enc")]
    controller, terminal = pty.openpty()
    # A terminal 120 columns wide (a new pseudo-terminal has none, and a bar needs some).
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    try:
        finished = subprocess.run(command, stderr=terminal, stdout=subprocess.DEVNULL, timeout=120, check=False)
        os.close(terminal)
        shown = b""
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: the terminal's other end is closed and drained
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(controller)
    assert finished.returncode == 0
    text = shown.decode(errors="replace")
    assert "8.00M" in text, text  # the total, in bytes
    assert "B/s" in text, text  # throughput
    assert re.search(r"\d\d:\d\d<\d\d:\d\d", text), text  # elapsed<remaining
    piped = cryptoctl(
        server, "encrypt", "--key", key_id, "--in", str(source), "--out", str(tmp_path / "b"), tenant=tenant
    )
    assert piped.returncode == 0 and piped.stderr == b""


def test_health_and_an_unreachable_service(launch: Launch) -> None:
    server = launch(CRYPTO_ROOT_KEY=base64.b64encode(os.urandom(32)).decode())
    assert _json(cryptoctl(server, "--json", "health")) == {"status": "SERVING"}
    server.terminate()
    down = cryptoctl(server, "--timeout", "1", "health")
    assert down.returncode == 6


def test_a_64_mib_file_round_trips_with_identical_bytes(
    server: CryptoServerProcess, tenant: str, tmp_path: Path
) -> None:
    key_id = cryptoctl(server, "keys", "create", "-f", "key_id", tenant=tenant).stdout.decode().strip()
    original = tmp_path / "video.bin"
    original.write_bytes(os.urandom(64 * MIB))
    sealed, restored = tmp_path / "video.enc", tmp_path / "video.out"
    encrypted = cryptoctl(
        server, "encrypt", "--key", key_id, "--in", str(original), "--out", str(sealed), tenant=tenant
    )
    assert encrypted.returncode == 0
    assert sealed.stat().st_size > original.stat().st_size
    decrypted = cryptoctl(
        server, "decrypt", "--key", key_id, "--in", str(sealed), "--out", str(restored), tenant=tenant
    )
    assert decrypted.returncode == 0, decrypted.stderr.decode()
    assert restored.read_bytes() == original.read_bytes()
    damaged = tmp_path / "damaged.enc"
    damaged.write_bytes(sealed.read_bytes()[:-100])
    failed = cryptoctl(server, "decrypt", "--in", str(damaged), "--out", str(tmp_path / "partial.out"), tenant=tenant)
    assert failed.returncode == 4
    assert not (tmp_path / "partial.out").exists()


def test_audit_tail_lists_the_tenants_records_and_verify_checks_the_chains(tmp_path: Path, tenant: str) -> None:
    root_key = base64.b64encode(os.urandom(32)).decode()
    env = {"CRYPTO_DATA_DIR": str(tmp_path / "data"), "CRYPTO_ROOT_KEY": root_key}
    process = CryptoServerProcess.launch({"CRYPTO_HOST": "127.0.0.1", "CRYPTO_PORT": "0", **env})
    try:
        created = _json(cryptoctl(process, "--json", "keys", "create", tenant=tenant))
        tail = _json(cryptoctl(process, "--json", "audit", "tail", "-n", "5", tenant=tenant))
        assert [(r["rpc"], r["phase"]) for r in tail[:2]] == [("CreateKey", "intent"), ("CreateKey", "outcome")]
        assert tail[1]["key_id"] == created["key_id"] and tail[1]["outcome"] == "OK"
    finally:
        assert process.terminate() == 0
    verified = subprocess.run(
        [str(BIN / "cryptoctl"), "audit", "verify"], env={**os.environ, **env}, capture_output=True, check=False
    )
    assert verified.returncode == 0, verified.stderr.decode()
    assert b"Traceback" not in verified.stderr
