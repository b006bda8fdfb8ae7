"""CRYPTO_ACCESS_LOG on a real server: which calls get an access line (all, errors, sampled:N), that a denial
always gets one, and that the metrics and the audit trail see every call whatever the mode."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

import grpc
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.transport import access_log
from crypto_server.transport.access_log import AccessRecord
from tests.conftest import ServerHandle, StartServer
from tests.transport.identity_support import TokenIssuer, bearer, tls_channel, write_server_files

TENANT = "acme"
CREATE = "/caas.crypto.v1.KeyService/CreateKey"
GET = "/caas.crypto.v1.KeyService/GetKey"
ENCRYPT = "/caas.crypto.v1.CryptoService/Encrypt"
DECRYPT = "/caas.crypto.v1.CryptoService/Decrypt"
MISSING_KEY = "00000000-0000-4000-8000-000000000000"


@pytest.fixture
def access_lines(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """The access records the server hands to logging (INFO on the access logger, as the default level)."""
    caplog.set_level(logging.INFO, logger=access_log.LOGGER_NAME)
    return caplog


def _logged(captured: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(method, code) of each access line, in the order the calls ended."""
    return [(r.method, r.code) for r in captured.records if isinstance(r, AccessRecord)]


def _session(server: ServerHandle) -> list[tuple[str, str]]:
    """Eight successful calls and two failures, in a known order; returns (method, code) of each."""
    calls = [(CREATE, "OK")]
    key = server.create_key(TENANT)
    for _ in range(4):
        server.encrypt(TENANT, key.key_id, b"x")
        calls.append((ENCRYPT, "OK"))
    with pytest.raises(grpc.RpcError):
        server.decrypt(TENANT, b"not a ciphertext")
    calls.append((DECRYPT, "INVALID_ARGUMENT"))
    with pytest.raises(grpc.RpcError):
        server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=MISSING_KEY))
    calls.append((GET, "NOT_FOUND"))
    for _ in range(3):
        server.encrypt(TENANT, key.key_id, b"x")
        calls.append((ENCRYPT, "OK"))
    return calls


def _failures(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [call for call in calls if call[1] != "OK"]


def _every_third_success_from_the_first(calls: list[tuple[str, str]]) -> list[tuple[str, str]]:
    kept = []
    successes = 0
    for call in calls:
        if call[1] != "OK":
            kept.append(call)
            continue
        if successes % 3 == 0:
            kept.append(call)
        successes += 1
    return kept


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize(
    ("mode", "selected"),
    [("all", lambda calls: calls), ("errors", _failures), ("sampled:3", _every_third_success_from_the_first)],
)
def test_the_mode_selects_which_calls_get_an_access_line(
    start_server: StartServer, access_lines: pytest.LogCaptureFixture, mode: str, selected: object
) -> None:
    server = start_server(access_log=mode)
    calls = _session(server)
    expected = selected(calls)  # type: ignore[operator]
    assert _logged(access_lines) == expected
    if mode == "sampled:3":
        # Successes 1, 4 and 7 of the 8 (counted, not drawn): CreateKey, the 3rd Encrypt, the 5th Encrypt.
        assert [call for call in expected if call[1] == "OK"] == [(CREATE, "OK"), (ENCRYPT, "OK"), (ENCRYPT, "OK")]
        assert len(expected) == 5


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("mode", ["errors", "sampled:1000000"])
def test_denied_calls_always_get_an_access_line(
    start_server: StartServer, access_lines: pytest.LogCaptureFixture, tmp_path: Path, mode: str
) -> None:
    ca = trustme.CA()
    files = write_server_files(ca, tmp_path / "tls")
    issuer = TokenIssuer()
    (tmp_path / "jwks.json").write_text(json.dumps(issuer.jwks()))
    policy = {"version": 1, "rules": [{"principals": ["operator"], "tenants": [TENANT], "permissions": ["encrypt"]}]}
    (tmp_path / "policy.json").write_text(json.dumps(policy))
    server = start_server(
        access_log=mode,
        tls_cert_file=files["cert"],
        tls_key_file=files["key"],
        jwks_file=tmp_path / "jwks.json",
        jwt_issuer=issuer.issuer,
        jwt_audience=issuer.audience,
        policy_file=tmp_path / "policy.json",
        reload_interval_s=0,
    )
    request = crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=MISSING_KEY, plaintext=b"x")
    with tls_channel(f"localhost:{server.running.port}", ca) as channel:
        encrypt = channel.unary_unary(
            ENCRYPT,
            request_serializer=crypto_pb.EncryptRequest.SerializeToString,
            response_deserializer=crypto_pb.EncryptResponse.FromString,
        )
        codes = []
        for metadata in ((), bearer(issuer.token("stranger")), bearer(issuer.token("operator"))):
            with pytest.raises(grpc.RpcError) as caught:
                encrypt(request, metadata=metadata, timeout=10)
            codes.append(caught.value.code())
    assert codes == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND]
    assert _logged(access_lines) == [
        (ENCRYPT, "UNAUTHENTICATED"),
        (ENCRYPT, "PERMISSION_DENIED"),
        (ENCRYPT, "NOT_FOUND"),
    ]


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.parametrize("backend", ["embedded"])
@pytest.mark.parametrize("mode", ["all", "errors", "sampled:3"])
def test_metrics_and_the_audit_trail_see_every_call_whatever_the_mode(
    start_server: StartServer, access_lines: pytest.LogCaptureFixture, mode: str
) -> None:
    server = start_server(access_log=mode, metrics_port=0, audit_crypto="all")
    calls = _session(server)
    assert server.running.metrics_port
    samples = _scrape(server.running.metrics_port)
    for method, code in set(calls):
        assert samples[("caas_crypto_rpc_total", (("code", code), ("method", method)))] == calls.count((method, code))
    assert samples[("caas_crypto_rpc_duration_seconds_count", (("method", ENCRYPT),))] == 7
    trail = server.running.audit
    assert trail is not None
    trail.flush()
    records = [json.loads(line) for line in (server.settings.data_dir / "audit.jsonl").read_text().splitlines()]
    crypto_outcomes = [(r["rpc"], r["outcome"]) for r in records if r.get("rpc") in {"Encrypt", "Decrypt"}]
    assert crypto_outcomes == [
        (method.rsplit("/", 1)[1], code) for method, code in calls if method in {ENCRYPT, DECRYPT}
    ]
    assert len(_logged(access_lines)) < len(calls) or mode == "all"
