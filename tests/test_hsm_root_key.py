"""The root key in a PKCS#11 token (SoftHSM2): never readable, refused settings, crypto-init-hsm, and a token that
goes away while the server runs.

The behaviour tests where the root key takes part also run with the HSM root key (the "embedded+hsm" and
"mongo+redis+hsm" backends: the round trip, rotation across a restart, the key hierarchy, destruction, backups), and
the migration file -> HSM -> file is in tests/test_root_key_rotation.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc, resources_pb2
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.config import ConfigError
from crypto_server.pkcs11_root_key import Pkcs11Module
from tests.conftest import HSM_BACKENDS, Launch, StartServer, expect_error
from tests.servers import SoftHsm
from tests.transport.test_metrics import _scrape
from tests.waiting import eventually

KEY_SERVICE = "caas.crypto.v1.KeyService"


@pytest.fixture
def backend() -> str:
    return HSM_BACKENDS[0]


@pytest.fixture
def token_session(softhsm: SoftHsm) -> Iterator[object]:
    """A read-write session on the shared test token, the user logged in (as any program holding the PIN)."""
    module = Pkcs11Module.load(softhsm.library)
    with module.calls() as generation:
        token = module.token(softhsm.token_label)
        session = module.open_session(token, SoftHsm.PIN, generation, rw=True)
    yield session
    session.close()


def test_the_root_key_never_leaves_the_token(softhsm: SoftHsm, token_session: object) -> None:
    root = token_session.get_key(object_class=ObjectClass.SECRET_KEY, label=SoftHsm.ROOT_LABEL)  # type: ignore[attr-defined]
    assert root[Attribute.SENSITIVE] is True and root[Attribute.EXTRACTABLE] is False
    assert root[Attribute.MODIFIABLE] is False, "nobody can turn the protections off later"
    with pytest.raises(p11.AttributeSensitive):
        root[Attribute.VALUE]
    # Nor wrapped under another key, which would hand out its bytes encrypted under a key the caller knows.
    wrapping = token_session.generate_key(KeyType.AES, 256, store=False, template={Attribute.WRAP: True})  # type: ignore[attr-defined]
    with pytest.raises(p11.KeyUnextractable):
        wrapping.wrap_key(root, mechanism=Mechanism.AES_KEY_WRAP)


def _run_to_exit(env: dict[str, str], tmp_path: Path) -> tuple[int, str]:
    clean = {name: value for name, value in os.environ.items() if not name.startswith("CRYPTO_")}
    process = subprocess.run(
        [sys.executable, "-m", "crypto_server"],
        env={**clean, "CRYPTO_HOST": "127.0.0.1", "CRYPTO_PORT": "0", "CRYPTO_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return process.returncode, process.stderr


def _wrong_pin(hsm: SoftHsm, tmp_path: Path) -> dict[str, str]:
    pin_file = tmp_path / "wrong-pin"
    pin_file.write_text("0000\n")
    pin_file.chmod(0o600)
    return {**hsm.env(), "CRYPTO_PKCS11_PIN_FILE": str(pin_file)}


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong PIN", "CRYPTO_PKCS11_PIN_FILE: token 'caas-test' refused the PIN (PinIncorrect)"),
        ("missing token", "CRYPTO_PKCS11_TOKEN_LABEL: "),
        ("missing key label", "CRYPTO_PKCS11_KEY_LABEL: token 'caas-test' has no secret key labelled 'absent'"),
        ("wrong library path", "CRYPTO_PKCS11_LIBRARY /nonexistent/libpkcs11.so does not exist"),
        ("not a PKCS#11 library", "cannot be loaded as a PKCS#11 module"),
        ("PIN file open to others", "is open to other users"),
        ("missing setting", "CRYPTO_ROOT_KEY_PROVIDER=pkcs11 needs CRYPTO_PKCS11_PIN_FILE"),
    ],
)
def test_a_bad_hsm_setting_stops_the_server_with_one_line_and_exit_2(
    softhsm: SoftHsm, tmp_path: Path, case: str, expected: str
) -> None:
    env = {
        "wrong PIN": _wrong_pin(softhsm, tmp_path),
        "missing token": {**softhsm.env(), "CRYPTO_PKCS11_TOKEN_LABEL": "no-such-token"},
        "missing key label": {**softhsm.env("absent")},
        "wrong library path": {**softhsm.env(), "CRYPTO_PKCS11_LIBRARY": "/nonexistent/libpkcs11.so"},
        "not a PKCS#11 library": {**softhsm.env(), "CRYPTO_PKCS11_LIBRARY": sys.executable},
        "PIN file open to others": {**softhsm.env(), "CRYPTO_PKCS11_PIN_FILE": str(_open_pin_file(tmp_path))},
        "missing setting": {**softhsm.env(), "CRYPTO_PKCS11_PIN_FILE": ""},
    }[case]
    code, stderr = _run_to_exit(env, tmp_path)
    assert code == 2
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert expected in stderr
    assert SoftHsm.PIN not in stderr


def _open_pin_file(tmp_path: Path) -> Path:
    pin_file = tmp_path / "shared-pin"
    pin_file.write_text(SoftHsm.PIN + "\n")
    pin_file.chmod(0o644)
    return pin_file


def test_the_pin_and_root_key_from_a_file_are_not_both_accepted(softhsm: SoftHsm, tmp_path: Path) -> None:
    code, stderr = _run_to_exit({**softhsm.env(), "CRYPTO_ROOT_KEY_FILE": str(tmp_path / "root.key")}, tmp_path)
    assert code == 2 and "unset CRYPTO_ROOT_KEY and CRYPTO_ROOT_KEY_FILE" in stderr


def test_init_hsm_is_idempotent(softhsm: SoftHsm) -> None:
    first = softhsm.init_key("idempotent")
    again = softhsm.init_key("idempotent")
    assert first["created"] is True and again["created"] is False
    assert again["fingerprint"] == first["fingerprint"]


def test_init_hsm_refuses_a_label_taken_by_a_key_that_can_leave_the_token(
    softhsm: SoftHsm, token_session: object, start_server: StartServer
) -> None:
    token_session.generate_key(  # type: ignore[attr-defined]
        KeyType.AES, 256, label="loose", store=True, template={Attribute.SENSITIVE: False, Attribute.EXTRACTABLE: True}
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("CRYPTO_")}
    process = subprocess.run(
        [sys.executable, "-m", "crypto_server.init_hsm", "--label", "loose"],
        env={**env, **softhsm.env("loose")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert process.returncode == 2
    assert "refusing to create a second key under the same label" in process.stderr
    # Nor does the server take it as its root key.
    with pytest.raises(ConfigError, match="can leave the token"):
        start_server(pkcs11_key_label="loose")


def test_a_server_on_the_hsm_logs_the_same_fingerprint_as_crypto_init_hsm(softhsm: SoftHsm, launch: Launch) -> None:
    report = softhsm.init_key(SoftHsm.ROOT_LABEL)
    server = launch(**softhsm.env())
    assert server.wait_for_log("root key loaded")["fingerprint"] == report["fingerprint"]


def test_a_token_removed_while_serving_fails_cold_keys_only_and_recovers_without_restart(
    softhsm: SoftHsm, launch: Launch, tmp_path: Path
) -> None:
    # Its own token (in its own directory) and server process: moving the token away must not disturb the
    # token the other tests share.
    own = SoftHsm.create(tmp_path / "own-hsm", softhsm.library)
    own.init_key(SoftHsm.ROOT_LABEL)
    server = launch(**own.env(), CRYPTO_HEALTH_INTERVAL="0.1")
    with grpc.insecure_channel(server.address) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        crypto = crypto_service_pb2_grpc.CryptoServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        def key_service_status() -> int:
            answer = health.Check(health_pb2.HealthCheckRequest(service=KEY_SERVICE), timeout=5)
            status: int = answer.status
            return status

        def create(tenant: str) -> str:
            request = key_pb.CreateKeyRequest(tenant_id=tenant, key_type=resources_pb2.KEY_TYPE_DATA)
            key_id: str = keys.CreateKey(request).key.key_id
            return key_id

        def encrypt(tenant: str, key_id: str) -> bytes:
            request = crypto_pb.EncryptRequest(tenant_id=tenant, key_id=key_id, plaintext=b"secret " + tenant.encode())
            ciphertext: bytes = crypto.Encrypt(request).ciphertext
            return ciphertext

        def decrypt(tenant: str, ciphertext: bytes) -> bytes:
            plaintext: bytes = crypto.Decrypt(
                crypto_pb.DecryptRequest(tenant_id=tenant, ciphertext=ciphertext)
            ).plaintext
            return plaintext

        warm_key = create("warm")
        warm_ciphertext = encrypt("warm", warm_key)  # the warm tenant's master key is now unwrapped in memory
        cold_key = create("cold")  # wrapped through the cold tenant's master key, which stays wrapped
        assert key_service_status() == health_pb2.HealthCheckResponse.SERVING

        token = own.token_directory()
        away = tmp_path / "token-away"
        shutil.move(token, away)
        try:
            assert decrypt("warm", warm_ciphertext) == b"secret warm"
            assert decrypt("warm", encrypt("warm", warm_key)) == b"secret warm"
            refused = expect_error(
                lambda: encrypt("cold", cold_key), grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_ROOT_KEY_UNAVAILABLE"
            )
            assert "retry later" in (refused.details() or "")
            assert str(own.library) not in (refused.details() or ""), "the module and token are for the log"
            expect_error(lambda: create("new"), grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_ROOT_KEY_UNAVAILABLE")
            eventually(
                lambda: key_service_status() == health_pb2.HealthCheckResponse.NOT_SERVING,
                timeout_s=20,
                what="KeyService NOT_SERVING without its token",
            )
            assert server.wait_for_log("root key unusable")["health"] == "NOT_SERVING"
        finally:
            shutil.move(away, token)

        eventually(
            lambda: key_service_status() == health_pb2.HealthCheckResponse.SERVING,
            timeout_s=20,
            what="KeyService SERVING with its token back",
        )
        assert decrypt("cold", encrypt("cold", cold_key)) == b"secret cold"
        assert decrypt("new", encrypt("new", create("new"))) == b"secret new"
        assert decrypt("warm", warm_ciphertext) == b"secret warm"
    assert server.terminate() == 0


def test_the_root_key_metrics_count_unwraps_in_the_hsm(start_server: StartServer) -> None:
    server = start_server(metrics_port=0)
    key = server.create_key("t1")
    server.encrypt("t1", key.key_id, b"first use")
    assert server.running.metrics_port
    samples = _scrape(server.running.metrics_port)
    root = (("role", "root"),)
    assert samples[("caas_crypto_root_key_available", root)] == 1
    # At least the metadata key, the new master key's wrap and its unwrap on first use.
    assert samples[("caas_crypto_root_key_operation_seconds_count", root)] >= 3
    assert samples[("caas_crypto_root_key_operation_seconds_sum", root)] > 0
    assert samples[("caas_crypto_root_key_errors_total", root)] == 0
