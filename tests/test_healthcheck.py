"""`crypto-healthcheck` as probes run it: a subprocess, judged by its exit code (grpc-health-probe's codes).

TLS is checked against a small grpc.health.v1 server with certificates from `trustme` (the crypto server
itself has no TLS yet), with and without client certificates.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import trustme
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.conftest import Launch

HEALTHCHECK = str(Path(sys.executable).parent / "crypto-healthcheck")


def probe(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([HEALTHCHECK, *args], capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr
    return result


class _BlockingHealth(health.HealthServicer):
    """Answers only when released: a Check that outlasts the probe's deadline."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        self.release.wait(30)
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


class TlsHealthServer:
    def __init__(self, directory: Path, *, require_client_certificate: bool) -> None:
        self.ca = trustme.CA()
        server_certificate = self.ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        client = self.ca.issue_cert("probe@example.test")
        self.client_cert, self.client_key = directory / "client.pem", directory / "client.key"
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        credentials = grpc.ssl_server_credentials(
            [(server_certificate.private_key_pem.bytes(), server_certificate.cert_chain_pems[0].bytes())],
            root_certificates=self.ca.cert_pem.bytes() if require_client_certificate else None,
            require_client_auth=require_client_certificate,
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self.health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.health.set("down.Service", health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self.server.add_secure_port("127.0.0.1:0", credentials)
        self.server.start()

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[TlsHealthServer]:
    server = TlsHealthServer(tmp_path, require_client_certificate=False)
    yield server
    server.server.stop(None)


@pytest.fixture
def mtls_server(tmp_path: Path) -> Iterator[TlsHealthServer]:
    server = TlsHealthServer(tmp_path, require_client_certificate=True)
    yield server
    server.server.stop(None)


def test_help_documents_the_options_and_exit_codes() -> None:
    shown = probe("--help")
    assert shown.returncode == 0
    for option in ("--addr", "--service", "--tls", "--ca", "--cert", "--key", "--connect-timeout", "--rpc-timeout"):
        assert option in shown.stdout
    assert "4  unhealthy" in shown.stdout


def test_the_crypto_server_is_serving_and_a_stopped_one_is_a_connection_failure(launch: Launch) -> None:
    server = launch()
    ok = probe("--addr", server.address)
    assert ok.returncode == 0 and ok.stdout.strip() == "SERVING"
    assert probe("--addr", server.address, "--service", "caas.crypto.v1.KeyService").returncode == 0
    unknown = probe("--addr", server.address, "--service", "no.such.Service")
    assert unknown.returncode == 3 and "NOT_FOUND" in unknown.stderr
    server.terminate()
    down = probe("--addr", server.address, "--connect-timeout", "1")
    assert down.returncode == 2 and len(down.stderr.splitlines()) == 1


def test_a_not_serving_service_is_unhealthy(tls_server: TlsHealthServer) -> None:
    result = probe("--addr", tls_server.addr, "--ca", str(tls_server.ca_file), "--service", "down.Service")
    assert result.returncode == 4 and "NOT_SERVING" in result.stderr


def test_tls_with_the_servers_ca_is_serving(tls_server: TlsHealthServer) -> None:
    assert probe("--addr", tls_server.addr, "--tls", "--ca", str(tls_server.ca_file)).returncode == 0
    named = probe("--addr", tls_server.addr, "--ca", str(tls_server.ca_file), "--tls-server-name", "localhost")
    assert named.returncode == 0


def test_tls_refuses_a_server_it_cannot_verify(tls_server: TlsHealthServer, tmp_path: Path) -> None:
    stranger = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(stranger))
    refused = probe("--addr", tls_server.addr, "--ca", str(stranger), "--connect-timeout", "1")
    assert refused.returncode == 2
    plaintext = probe("--addr", tls_server.addr, "--connect-timeout", "1")
    assert plaintext.returncode == 2


def test_mutual_tls_needs_the_client_certificate(mtls_server: TlsHealthServer) -> None:
    ca = str(mtls_server.ca_file)
    without = probe("--addr", mtls_server.addr, "--ca", ca, "--connect-timeout", "1")
    assert without.returncode == 2
    cert, key = str(mtls_server.client_cert), str(mtls_server.client_key)
    assert probe("--addr", mtls_server.addr, "--ca", ca, "--cert", cert, "--key", key).returncode == 0


def test_a_check_slower_than_the_rpc_timeout_is_an_rpc_failure() -> None:
    slow = _BlockingHealth()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(slow, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        timed_out = probe("--addr", f"127.0.0.1:{port}", "--rpc-timeout", "0.2")
        assert timed_out.returncode == 3 and "DEADLINE_EXCEEDED" in timed_out.stderr
    finally:
        slow.release.set()
        server.stop(None)


def test_invalid_arguments_exit_1_in_one_line(tmp_path: Path) -> None:
    for args in (("--bogus",), ("--cert", str(tmp_path / "c.pem")), ("--ca", str(tmp_path / "missing.pem"))):
        result = probe(*args)
        assert result.returncode == 1, args
        assert len(result.stderr.splitlines()) == 1, result.stderr
