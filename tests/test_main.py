"""The server as an operator runs it: `python -m crypto_server`, configured by the environment."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc, resources_pb2
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.__main__ import security_description, store_description
from crypto_server.config import Settings
from crypto_server.domain.key_wrap import root_key_fingerprint
from tests.conftest import Launch, write_root_key_file
from tests.transport.identity_support import TokenIssuer, write_server_files
from tests.waiting import eventually


def _run_to_exit(env: dict[str, str], timeout_s: float = 20) -> tuple[int, str]:
    process = subprocess.run(
        [sys.executable, "-m", "crypto_server"],
        env={**os.environ, "CRYPTO_HOST": "127.0.0.1", "CRYPTO_PORT": "0", **env},
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    return process.returncode, process.stderr


def test_serves_logs_one_json_line_per_rpc_and_exits_0_on_sigterm(launch: Launch, tmp_path: Path) -> None:
    server = launch()
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        crypto = crypto_service_pb2_grpc.CryptoServiceStub(channel)
        key = keys.CreateKey(key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)).key
        sealed, call = crypto.Encrypt.with_call(
            crypto_pb.EncryptRequest(
                tenant_id="acme", key_id=key.key_id, plaintext=b"PLAINTEXT-MARKER", aad=b"AAD-MARKER"
            ),
            metadata=(("x-request-id", "req-123"),),
        )
        assert ("x-request-id", "req-123") in call.trailing_metadata()
        crypto.Decrypt(crypto_pb.DecryptRequest(tenant_id="acme", ciphertext=sealed.ciphertext, aad=b"AAD-MARKER"))
        with pytest.raises(grpc.RpcError):
            crypto.Decrypt(crypto_pb.DecryptRequest(tenant_id="acme", ciphertext=b"garbage"))
    # The server process writes its access lines from its own logging thread.
    eventually(
        lambda: len([e for e in server.logs() if e.get("msg") == "rpc"]) >= 4, timeout_s=5, what="four rpc lines"
    )
    rpcs = [entry for entry in server.logs() if entry.get("msg") == "rpc"]
    assert [(e["method"], e["code"]) for e in rpcs] == [
        ("/caas.crypto.v1.KeyService/CreateKey", "OK"),
        ("/caas.crypto.v1.CryptoService/Encrypt", "OK"),
        ("/caas.crypto.v1.CryptoService/Decrypt", "OK"),
        ("/caas.crypto.v1.CryptoService/Decrypt", "INVALID_ARGUMENT"),
    ]
    encrypt_line = rpcs[1]
    assert encrypt_line["tenant_id"] == "acme"
    assert encrypt_line["key_id"] == key.key_id
    assert encrypt_line["request_id"] == "req-123"
    assert isinstance(encrypt_line["duration_ms"], float)
    assert len({e["request_id"] for e in rpcs}) == 4
    assert server.terminate() == 0
    text = "\n".join(server.lines)
    assert "PLAINTEXT-MARKER" not in text and "AAD-MARKER" not in text
    root_key = (tmp_path / "data" / "root.key").read_text().strip()
    assert root_key not in text
    assert server.wait_for_log("stopped")


def test_health_goes_not_serving_before_shutdown_and_in_flight_calls_finish(launch: Launch) -> None:
    server = launch(CRYPTO_SHUTDOWN_GRACE="5")
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        key = (
            key_service_pb2_grpc.KeyServiceStub(channel)
            .CreateKey(key_pb.CreateKeyRequest(tenant_id="t", key_type=resources_pb2.KEY_TYPE_DATA))
            .key
        )
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        crypto = crypto_service_pb2_grpc.CryptoServiceStub(channel)
        request = crypto_pb.EncryptRequest(tenant_id="t", key_id=key.key_id, plaintext=b"\0" * 65536)
        calls = [crypto.Encrypt.future(request) for _ in range(200)]
        calls[0].result()
        server.process.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        outcomes = []
        for call in calls:
            error = call.exception(timeout=20)
            assert error is None or isinstance(error, grpc.Call)
            outcomes.append(grpc.StatusCode.OK if error is None else error.code())
    # Accepted calls finish; calls that arrive after the stop are refused as UNAVAILABLE, never cut off.
    assert set(outcomes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}
    assert outcomes.count(grpc.StatusCode.OK) >= 1
    assert server.process.wait(timeout=20) == 0


def test_generates_a_private_development_root_key_with_a_warning(launch: Launch, tmp_path: Path) -> None:
    server = launch()
    path = tmp_path / "data" / "root.key"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text())) == 32
    warning = server.wait_for_log(
        "using a development root key generated into the data directory; set CRYPTO_ROOT_KEY_FILE in production"
    )
    assert warning["level"] == "warning"


def test_the_data_directory_and_store_files_are_private_to_the_service_user(launch: Launch, tmp_path: Path) -> None:
    server = launch()
    data_dir = tmp_path / "data"
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            key_pb.CreateKeyRequest(tenant_id="t", key_type=resources_pb2.KEY_TYPE_DATA)
        )
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in data_dir.iterdir()}
    files = [
        "root.key",
        "keys.sqlite3",
        "keys.sqlite3-wal",
        "keys.sqlite3-shm",
        "audit.jsonl",
        "audit.jsonl.checkpoints",
    ]
    assert modes == dict.fromkeys(files, 0o600)
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    assert server.terminate() == 0


def test_a_root_key_file_open_to_other_users_is_refused_unless_allowed(launch: Launch, tmp_path: Path) -> None:
    key_file = write_root_key_file(tmp_path / "root.b64", base64.b64encode(os.urandom(32)).decode())
    key_file.chmod(0o644)
    code, stderr = _run_to_exit({"CRYPTO_DATA_DIR": str(tmp_path / "data"), "CRYPTO_ROOT_KEY_FILE": str(key_file)})
    assert code == 2
    assert "is open to other users (mode 0o644)" in stderr and "CRYPTO_ALLOW_INSECURE=1" in stderr
    assert "Traceback" not in stderr
    server = launch(CRYPTO_ROOT_KEY_FILE=str(key_file), CRYPTO_ALLOW_INSECURE="1")
    accepted = server.wait_for_log("accepting a root key file open to other users because CRYPTO_ALLOW_INSECURE is set")
    assert accepted["level"] == "warning"
    assert server.terminate() == 0


def test_the_root_key_variable_is_warned_about_and_only_its_fingerprint_logged(launch: Launch) -> None:
    key = os.urandom(32)
    server = launch(CRYPTO_ROOT_KEY=base64.b64encode(key).decode())
    warning = server.wait_for_log(
        "the root key comes from the CRYPTO_ROOT_KEY variable, which the process environment keeps; "
        "use CRYPTO_ROOT_KEY_FILE in production"
    )
    assert warning["level"] == "warning"
    assert server.wait_for_log("root key loaded")["fingerprint"] == root_key_fingerprint(key)
    assert server.terminate() == 0
    assert base64.b64encode(key).decode() not in "\n".join(server.lines)


def test_refuses_to_start_with_a_root_key_that_did_not_wrap_the_stored_keys(launch: Launch, tmp_path: Path) -> None:
    first_key = base64.b64encode(os.urandom(32)).decode()
    server = launch(CRYPTO_ROOT_KEY=first_key)
    with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        key_service_pb2_grpc.KeyServiceStub(channel).CreateKey(
            key_pb.CreateKeyRequest(tenant_id="t", key_type=resources_pb2.KEY_TYPE_DATA)
        )
    assert server.terminate() == 0
    key_file = write_root_key_file(tmp_path / "root.b64", base64.b64encode(os.urandom(32)).decode())
    code, stderr = _run_to_exit({"CRYPTO_DATA_DIR": str(tmp_path / "data"), "CRYPTO_ROOT_KEY_FILE": str(key_file)})
    assert code == 2
    assert "root key is not the one that wrapped the keys" in stderr
    write_root_key_file(key_file, first_key)
    restarted = launch(CRYPTO_ROOT_KEY_FILE=str(key_file))
    assert restarted.terminate() == 0


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"CRYPTO_PORT": "http"}, "CRYPTO_PORT must be an integer"),
        ({"CRYPTO_PORT": "70000"}, "CRYPTO_PORT must be between 0 and 65535"),
        ({"CRYPTO_WORKERS": "0"}, "CRYPTO_WORKERS must be between 1 and 1024"),
        ({"CRYPTO_ROOT_KEY": "not base64!"}, "CRYPTO_ROOT_KEY must be base64 text"),
        ({"CRYPTO_ROOT_KEY": base64.b64encode(b"short").decode()}, "must decode to 32 bytes"),
        ({"CRYPTO_ROOT_KEY": "x", "CRYPTO_ROOT_KEY_FILE": "/y"}, "not both"),
        ({"CRYPTO_ROOT_KEY_FILE": "/nonexistent/root.key"}, "cannot be read"),
        ({"CRYPTO_LOG_LEVEL": "LOUD"}, "CRYPTO_LOG_LEVEL"),
        ({"CRYPTO_ACCESS_LOG": "sometimes"}, "CRYPTO_ACCESS_LOG must be all, errors or sampled:N"),
        ({"CRYPTO_KEYRING_TTL": "soon"}, "CRYPTO_KEYRING_TTL"),
        ({"MONGODB_URI": "mongodb://127.0.0.1:1"}, "MONGODB_URI needs the root key"),
        (
            {"MONGODB_URI": "mongodb://127.0.0.1:1", "CRYPTO_ROOT_KEY": "x", "MONGODB_DATABASE": "a.b"},
            "MONGODB_DATABASE",
        ),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL must start with redis://"),
        ({"CRYPTO_CACHE_TTL": "0"}, "CRYPTO_CACHE_TTL must be between"),
        ({"CRYPTO_REUSE_PORT": "maybe"}, "CRYPTO_REUSE_PORT must be"),
    ],
)
def test_bad_configuration_exits_2_naming_the_variable(tmp_path: Path, env: dict[str, str], message: str) -> None:
    code, stderr = _run_to_exit({"CRYPTO_DATA_DIR": str(tmp_path / "data"), **env})
    assert code == 2
    errors = _json_lines_with_one_error(stderr)
    assert message in str(errors[0]["msg"]) and errors[0]["exit_code"] == 2


DEEPLY_NESTED_YAML = "rules:\n" + "".join("  " * level + "- \n" for level in range(1, 5000))


@pytest.mark.parametrize(
    ("variable", "content", "message"),
    [
        ("CRYPTO_POLICY_FILE", DEEPLY_NESTED_YAML, "nested too deeply to be a policy"),
        ("CRYPTO_JWKS_FILE", "[" * 5000 + "]" * 5000, "nested too deeply to be a JWKS"),
    ],
)
def test_a_deeply_nested_policy_or_jwks_file_exits_2(tmp_path: Path, variable: str, content: str, message: str) -> None:
    """Issue 23 item 5: 5,000 levels of YAML made the parser raise RecursionError: the server exited 1."""
    issuer = TokenIssuer()
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps(issuer.jwks()))
    path = tmp_path / "nested"
    path.write_text(content)
    env = {
        "CRYPTO_DATA_DIR": str(tmp_path / "data"),
        "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
        "CRYPTO_JWKS_FILE": str(jwks),  # a policy needs a way to identify callers
        "CRYPTO_JWT_ISSUER": issuer.issuer,
        "CRYPTO_JWT_AUDIENCE": issuer.audience,
        variable: str(path),
    }
    code, stderr = _run_to_exit(env)
    assert code == 2
    errors = _json_lines_with_one_error(stderr)
    assert message in str(errors[0]["msg"])


@pytest.mark.parametrize("exposure", ["all interfaces", "tls", "policy"])
def test_a_server_that_is_not_a_development_server_needs_a_root_key(tmp_path: Path, exposure: str) -> None:
    """Issue 23 item 11: a TLS + mTLS + policy server with no root key setting generated data/root.key beside
    the database, with only a warning."""
    env = {"CRYPTO_DATA_DIR": str(tmp_path / "data")}
    if exposure == "all interfaces":
        env.update(CRYPTO_HOST="0.0.0.0", CRYPTO_ALLOW_INSECURE="1")
    elif exposure == "tls":
        files = write_server_files(trustme.CA(), tmp_path / "tls")
        env.update(CRYPTO_TLS_CERT_FILE=str(files["cert"]), CRYPTO_TLS_KEY_FILE=str(files["key"]))
    else:
        issuer = TokenIssuer()
        (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
        (tmp_path / "policy.yaml").write_text("version: 1\nrules: []\n")
        env.update(
            CRYPTO_JWKS_FILE=str(tmp_path / "jwks.json"),
            CRYPTO_JWT_ISSUER=issuer.issuer,
            CRYPTO_JWT_AUDIENCE=issuer.audience,
            CRYPTO_POLICY_FILE=str(tmp_path / "policy.yaml"),
        )
    code, stderr = _run_to_exit(env)
    assert code == 2
    errors = _json_lines_with_one_error(stderr)
    assert "no root key is set" in str(errors[0]["msg"])
    assert not (tmp_path / "data" / "root.key").exists()


def _json_lines_with_one_error(stderr: str) -> list[dict[str, object]]:
    """Every line is a JSON log line, and exactly one of them is the error.

    Except the lines of grpc's C core (`E1129 07:20:46.788732 10713 add_port.cc:83] ...`), which it writes
    itself; GRPC_VERBOSITY=NONE silences them.
    """
    lines = [
        line
        for line in stderr.splitlines()
        if not re.match(r"[EWID]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \w+\.cc:\d+\]", line)
    ]
    entries = [json.loads(line) for line in lines]
    errors = [entry for entry in entries if entry["level"] == "error"]
    assert len(errors) == 1, stderr
    return errors


def test_the_serving_line_names_the_store_in_use_and_the_security_mode(launch: Launch, tmp_path: Path) -> None:
    server = launch()
    serving = server.wait_for_log("serving")
    assert serving["store"] == "embedded"
    assert serving["store_path"] == str((tmp_path / "data").resolve())
    assert serving["root_key_source"] == "generated (development only)"
    assert str(serving["transport"]).startswith("plaintext gRPC")
    assert server.terminate() == 0


def test_the_store_description_names_hosts_without_credentials() -> None:
    settings = Settings.from_env(
        {
            "MONGODB_URI": "mongodb://app:s3cret@db1:27017,db2:27017/admin?replicaSet=rs0",
            "MONGODB_DATABASE": "crypto",
            "REDIS_URL": "redis://:hunter2@cache:6379/2",
            "CRYPTO_ROOT_KEY_FILE": "/run/secrets/crypto_root_key",
        }
    )
    described = store_description(settings)
    assert described == {
        "store": "mongodb",
        "mongodb_hosts": "db1:27017,db2:27017",
        "mongodb_database": "crypto",
        "redis_host": "cache:6379/2",
    }
    assert security_description(settings)["root_key_source"] == "CRYPTO_ROOT_KEY_FILE"


def test_an_unreachable_mongodb_at_startup_is_a_clear_error(tmp_path: Path) -> None:
    env = {
        "CRYPTO_DATA_DIR": str(tmp_path / "data"),
        "MONGODB_URI": "mongodb://operator:PASSWORD-MARKER@127.0.0.1:9/?directConnection=true",
        "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
        "CRYPTO_STORE_TIMEOUT": "0.5",
    }
    code, stderr = _run_to_exit(env)
    assert code == 3, "not 2: the configuration is fine, the database is not there"
    error = _json_lines_with_one_error(stderr)[0]
    assert "cannot start: the key store at 127.0.0.1:9 did not answer" in str(error["msg"])
    assert error["mongodb_hosts"] == "127.0.0.1:9" and error["exit_code"] == 3
    assert "PASSWORD-MARKER" not in stderr and "operator" not in stderr


def test_a_port_in_use_is_a_clear_startup_error(launch: Launch, tmp_path: Path) -> None:
    first = launch()
    code, stderr = _run_to_exit({"CRYPTO_DATA_DIR": str(tmp_path / "other"), "CRYPTO_PORT": str(first.port)})
    assert code == 2
    assert f"cannot listen on 127.0.0.1:{first.port}" in str(_json_lines_with_one_error(stderr)[0]["msg"])
