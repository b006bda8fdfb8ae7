"""Safe defaults for transport security: what starts, what refuses to, and with which message."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from crypto_server.config import ConfigError, Settings
from tests.conftest import Launch


def test_non_loopback_bind_without_tls_and_policy_refuses_to_start(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, "-m", "crypto_server"],
        env={**os.environ, "CRYPTO_HOST": "0.0.0.0", "CRYPTO_PORT": "0", "CRYPTO_DATA_DIR": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert process.returncode == 2
    assert "CRYPTO_TLS_CERT_FILE" in process.stderr and "CRYPTO_POLICY_FILE" in process.stderr
    assert "CRYPTO_ALLOW_INSECURE=1" in process.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CRYPTO_HOST": "10.1.2.3"}, "CRYPTO_POLICY_FILE"),
        ({"CRYPTO_HOST": "::", "CRYPTO_TLS_CERT_FILE": "c", "CRYPTO_TLS_KEY_FILE": "k"}, "CRYPTO_POLICY_FILE"),
        ({"CRYPTO_TLS_CERT_FILE": "c"}, "CRYPTO_TLS_KEY_FILE"),
        ({"CRYPTO_TLS_CLIENT_CA_FILE": "ca"}, "CRYPTO_TLS_CERT_FILE"),
        ({"CRYPTO_JWKS_FILE": "j"}, "CRYPTO_JWT_ISSUER"),
        ({"CRYPTO_JWT_AUDIENCE": "a"}, "CRYPTO_JWKS_FILE"),
        ({"CRYPTO_POLICY_FILE": "p"}, "prove who they are"),
        ({"CRYPTO_REFLECTION": "maybe"}, "CRYPTO_REFLECTION"),
    ],
)
def test_inconsistent_security_settings_are_refused(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_explicitly_insecure_and_fully_protected_non_loopback_binds_are_accepted() -> None:
    assert Settings.from_env({"CRYPTO_HOST": "0.0.0.0", "CRYPTO_ALLOW_INSECURE": "1"}).host == "0.0.0.0"
    protected = Settings.from_env(
        {
            "CRYPTO_HOST": "0.0.0.0",
            "CRYPTO_TLS_CERT_FILE": "c",
            "CRYPTO_TLS_KEY_FILE": "k",
            "CRYPTO_TLS_CLIENT_CA_FILE": "ca",
            "CRYPTO_POLICY_FILE": "p",
        }
    )
    assert not protected.reflection_enabled
    assert Settings.from_env({**{"CRYPTO_HOST": "0.0.0.0", "CRYPTO_ALLOW_INSECURE": "1"}}).reflection_enabled is False
    assert Settings.from_env(
        {"CRYPTO_REFLECTION": "1", "CRYPTO_HOST": "0.0.0.0", "CRYPTO_ALLOW_INSECURE": "1"}
    ).reflection_enabled


def test_one_command_development_start_serves_plaintext_with_reflection_and_a_warning(launch: Launch) -> None:
    server = launch()
    with grpc.insecure_channel(server.address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(
            stub.ServerReflectionInfo(  # type: ignore[operator]  # untyped stub
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
    names = {service.name for service in answers[0].list_services_response.service}
    assert "caas.crypto.v1.KeyService" in names
    warnings = [entry for entry in server.logs() if "INSECURE" in str(entry.get("msg", ""))]
    assert warnings and warnings[0]["level"] == "warning"
