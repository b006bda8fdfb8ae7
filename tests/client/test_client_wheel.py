"""The client installs alone: its wheel, in a fresh virtualenv, with no server dependency, talks to a server.

Builds caas-crypto-client from client/pyproject.toml, installs it into a new venv (its dependencies come from
the package index), and runs a round trip there against a server started from the main environment.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.conftest import Launch

ROOT = Path(__file__).resolve().parents[2]

ROUND_TRIP = """
import importlib.util, sys
import crypto_client
from crypto_client import CryptoClient, FileCipher, TokenSigner, AsyncCryptoClient
assert crypto_client.__file__.startswith(sys.prefix), crypto_client.__file__
absent = [name for name in ("crypto_server", "pymongo", "redis", "prometheus_client") if importlib.util.find_spec(name)]
assert not absent, absent
with CryptoClient(sys.argv[1]) as crypto:
    key = crypto.create_key(tenant_id="wheel")
    sealed = crypto.encrypt(key.key_id, b"from the wheel", tenant_id="wheel")
    print(crypto.decrypt(sealed.ciphertext, tenant_id="wheel").plaintext.decode())
"""


@pytest.mark.timeout(600)
def test_the_client_wheel_installs_alone_and_round_trips(launch: Launch, tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(wheels), "."],
        cwd=ROOT / "client",
        check=True,
    )
    (wheel,) = wheels.glob("caas_crypto_client-*.whl")
    environment = tmp_path / "venv"
    venv.create(environment, with_pip=True)
    python = environment / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", str(wheel)], check=True, cwd=tmp_path)
    installed = subprocess.run([python, "-m", "pip", "list", "--format=freeze"], capture_output=True, text=True)
    names = {line.split("==")[0].lower() for line in installed.stdout.split()}
    assert names.isdisjoint({"pymongo", "redis", "prometheus-client", "caas-crypto-server"}), names

    server = launch(CRYPTO_ROOT_KEY=base64.b64encode(os.urandom(32)).decode())
    # -I: the virtualenv's own packages only (not this checkout, not PYTHONPATH).
    result = subprocess.run(
        [python, "-I", "-c", ROUND_TRIP, server.address], capture_output=True, text=True, cwd=tmp_path, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "from the wheel"
    cli = subprocess.run([environment / "bin" / "cryptoctl", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert cli.returncode == 0 and "usage" in cli.stdout.lower(), cli.stderr
