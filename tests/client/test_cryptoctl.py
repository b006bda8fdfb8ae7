"""cryptoctl, run as operators run it (a subprocess) against a real server process."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Launch
from tests.servers import CryptoServerProcess

MIB = 1024 * 1024


@pytest.fixture
def server(launch: Launch) -> CryptoServerProcess:
    return launch(CRYPTO_ROOT_KEY=base64.b64encode(os.urandom(32)).decode())


def cryptoctl(
    server: CryptoServerProcess, *args: str, tenant: str = "acme", stdin: bytes | None = None
) -> subprocess.CompletedProcess[bytes]:
    executable = Path(sys.executable).parent / "cryptoctl"
    return subprocess.run(
        [str(executable), "--target", server.address, "--tenant", tenant, *args],
        input=stdin,
        capture_output=True,
        timeout=300,
        check=False,
    )


def _json(result: subprocess.CompletedProcess[bytes]) -> Any:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_key_commands_with_table_and_json_output(server: CryptoServerProcess) -> None:
    created = _json(cryptoctl(server, "--json", "keys", "create", "--label", "team=media"))
    assert isinstance(created, list)
    key_id = created[0]["key_id"]
    assert created[0]["labels"] == {"team": "media"} and created[0]["state"] == "ENABLED"
    table = cryptoctl(server, "keys", "list")
    assert table.returncode == 0
    assert b"KEY_ID" in table.stdout and key_id.encode() in table.stdout
    listed = _json(cryptoctl(server, "--json", "keys", "list", "--type", "data"))
    assert [k["key_id"] for k in listed] == [key_id]
    rotated = _json(cryptoctl(server, "--json", "keys", "rotate", key_id))
    assert rotated[0]["primary_version"] == 2
    assert _json(cryptoctl(server, "--json", "keys", "disable", key_id))[0]["state"] == "DISABLED"
    assert _json(cryptoctl(server, "--json", "keys", "enable", key_id))[0]["state"] == "ENABLED"
    assert _json(cryptoctl(server, "--json", "keys", "get", key_id))[0]["primary_version"] == 2
    signer = _json(cryptoctl(server, "--json", "keys", "create", "--algorithm", "ed25519"))
    assert signer[0]["algorithm"] == "ED25519"


def test_value_round_trip_and_exit_codes(server: CryptoServerProcess) -> None:
    key_id = _json(cryptoctl(server, "--json", "keys", "create"))[0]["key_id"]
    sealed = _json(cryptoctl(server, "--json", "encrypt", "--key", key_id, "--value", "hello", "--aad", "ctx"))
    ciphertext = sealed["ciphertext"]
    opened = _json(cryptoctl(server, "--json", "decrypt", "--value", ciphertext, "--aad", "ctx"))
    assert opened["plaintext"] == "hello"
    assert cryptoctl(server, "decrypt", "--value", ciphertext, "--aad", "other").returncode == 4
    assert cryptoctl(server, "keys", "get", "00000000-0000-4000-8000-000000000000").returncode == 3
    cryptoctl(server, "keys", "disable", key_id)
    refused = cryptoctl(server, "encrypt", "--key", key_id, "--value", "x")
    assert refused.returncode == 5 and b"disabled" in refused.stderr
    assert cryptoctl(server, "keys", "list", tenant="bad tenant").returncode == 2
    assert cryptoctl(server, "keys", "list", tenant="").returncode == 2


def test_health_and_an_unreachable_service(server: CryptoServerProcess) -> None:
    assert _json(cryptoctl(server, "--json", "health")) == {"status": "SERVING"}
    server.terminate()
    down = cryptoctl(server, "--timeout", "1", "health")
    assert down.returncode == 6


def test_a_64_mib_file_round_trips_with_identical_bytes(server: CryptoServerProcess, tmp_path: Path) -> None:
    key_id = _json(cryptoctl(server, "--json", "keys", "create"))[0]["key_id"]
    original = tmp_path / "video.bin"
    original.write_bytes(os.urandom(64 * MIB))
    sealed, restored = tmp_path / "video.enc", tmp_path / "video.out"
    assert cryptoctl(server, "encrypt", "--key", key_id, "--in", str(original), "--out", str(sealed)).returncode == 0
    assert sealed.stat().st_size > original.stat().st_size
    decrypted = cryptoctl(server, "decrypt", "--key", key_id, "--in", str(sealed), "--out", str(restored))
    assert decrypted.returncode == 0, decrypted.stderr.decode()
    assert restored.read_bytes() == original.read_bytes()
    damaged = tmp_path / "damaged.enc"
    damaged.write_bytes(sealed.read_bytes()[:-100])
    failed = cryptoctl(server, "decrypt", "--in", str(damaged), "--out", str(tmp_path / "partial.out"))
    assert failed.returncode == 4
    assert not (tmp_path / "partial.out").exists()


def test_stdin_and_stdout_are_the_default_streams(server: CryptoServerProcess) -> None:
    key_id = _json(cryptoctl(server, "--json", "keys", "create"))[0]["key_id"]
    payload = os.urandom(300_000)
    sealed = cryptoctl(server, "encrypt", "--key", key_id, stdin=payload)
    assert sealed.returncode == 0 and payload not in sealed.stdout
    opened = cryptoctl(server, "decrypt", stdin=sealed.stdout)
    assert opened.returncode == 0 and opened.stdout == payload
