"""cryptoctl keys export / import, run as operators run them, between two server processes (two deployments)."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import x25519

from tests.conftest import Launch
from tests.servers import CryptoServerProcess

BIN = Path(sys.executable).parent
TENANT = "acme"


def cryptoctl(server: CryptoServerProcess, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [str(BIN / "cryptoctl"), "--target", server.address, "--tenant", TENANT, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert "Traceback" not in result.stderr
    return result


def _ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _private(path: Path, data: bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def test_a_key_exported_with_cryptoctl_restores_into_another_deployment(launch: Launch, tmp_path: Path) -> None:
    backup_key = x25519.X25519PrivateKey.generate()
    public_pem = tmp_path / "backup.pub.pem"
    public_pem.write_bytes(
        backup_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    private_pem = _private(
        tmp_path / "backup.pem",
        backup_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
    )
    source = launch(CRYPTO_DATA_DIR=str(tmp_path / "source"), CRYPTO_ROOT_KEY=base64.b64encode(os.urandom(32)).decode())
    target = launch(
        CRYPTO_DATA_DIR=str(tmp_path / "target"),
        CRYPTO_ROOT_KEY=base64.b64encode(os.urandom(32)).decode(),
        CRYPTO_BACKUP_PRIVATE_KEY_FILE=str(private_pem),
    )
    key_id = _ok(cryptoctl(source, "keys", "create", "--label", "team=media", "-f", "key_id"))
    ciphertext = _ok(cryptoctl(source, "encrypt", "--key", key_id, "--value", "hello", "-f", "ciphertext"))

    usage = cryptoctl(source, "keys", "export", key_id, "--out", str(tmp_path / "none.backup"))
    assert usage.returncode == 2 and "--backup-public-key FILE or --root-key" in usage.stderr
    backup_file = tmp_path / "key.backup"
    exported = json.loads(
        _ok(cryptoctl(source, "--json", "keys", "export", key_id, "--backup-public-key", str(public_pem), "--out",
                      str(backup_file)))
    )  # fmt: skip
    assert exported["key_id"] == key_id and exported["bytes"] == backup_file.stat().st_size
    assert stat.S_IMODE(backup_file.stat().st_mode) == 0o600

    restored = json.loads(_ok(cryptoctl(target, "--json", "keys", "import", "--in", str(backup_file))))
    assert (restored["key_id"], restored["labels"]) == (key_id, {"team": "media"})
    assert _ok(cryptoctl(target, "decrypt", "--value", ciphertext, "--text", "-f", "plaintext")) == "hello"

    again = cryptoctl(target, "keys", "import", "--in", str(backup_file))
    assert again.returncode == 1 and "ERROR_REASON_KEY_EXISTS" in again.stderr
    # The backup was made for the target's backup key, not the source's: the source cannot open it.
    elsewhere = cryptoctl(source, "keys", "import", "--in", str(backup_file))
    assert elsewhere.returncode == 5 and "ERROR_REASON_BACKUP_KEY_MISMATCH" in elsewhere.stderr
    altered = bytearray(backup_file.read_bytes())
    altered[-1] ^= 1
    (tmp_path / "altered.backup").write_bytes(bytes(altered))
    tampered = cryptoctl(target, "keys", "import", "--in", str(tmp_path / "altered.backup"))
    assert tampered.returncode == 4 and "ERROR_REASON_BACKUP_TAMPERED" in tampered.stderr
