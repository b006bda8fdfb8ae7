"""Prometheus metrics: scraped over HTTP after some RPCs, the documented series with sane values."""

from __future__ import annotations

import platform
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server import __version__
from tests.conftest import ServerHandle, StartServer


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.fixture
def backend() -> str:
    """One store: the series are the transport's and the keyring's; the key and tenant gauges come from the
    store's key_counts, proven on every store by tests/storage/test_contract.py."""
    return "embedded"


@pytest.fixture
def server(start_server: StartServer) -> ServerHandle:
    return start_server(metrics_port=0)


def test_rpc_counts_latency_in_flight_cache_and_key_gauges(server: ServerHandle) -> None:
    assert server.running.metrics_port
    key = server.create_key("t1")
    server.create_key("t2")
    for _ in range(5):
        server.decrypt("t1", server.encrypt("t1", key.key_id, b"x").ciphertext)
    with pytest.raises(grpc.RpcError):
        server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="t1", key_id="00000000-0000-4000-8000-000000000000"))
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id="t1", key_id=key.key_id))
    samples = _scrape(server.running.metrics_port)
    encrypt = "/caas.crypto.v1.CryptoService/Encrypt"
    assert samples[("caas_crypto_rpc_total", (("code", "OK"), ("method", encrypt)))] == 5
    not_found = (("code", "NOT_FOUND"), ("method", "/caas.crypto.v1.KeyService/GetKey"))
    assert samples[("caas_crypto_rpc_total", not_found)] == 1
    assert samples[("caas_crypto_rpc_duration_seconds_count", (("method", encrypt),))] == 5
    assert 0 < samples[("caas_crypto_rpc_duration_seconds_sum", (("method", encrypt),))] < 5
    assert samples[("caas_crypto_rpc_in_flight", ())] == 0
    hits = samples[("caas_crypto_keyring_lookups_total", (("result", "hit"),))]
    misses = samples[("caas_crypto_keyring_lookups_total", (("result", "miss"),))]
    assert hits >= 9 and misses >= 1
    assert samples[("caas_crypto_keys", (("key_type", "DATA"), ("state", "DISABLED")))] == 1
    assert samples[("caas_crypto_keys", (("key_type", "DATA"), ("state", "ENABLED")))] == 1
    assert samples[("caas_crypto_keys", (("key_type", "MASTER"), ("state", "ENABLED")))] == 2
    assert samples[("caas_crypto_tenants", ())] == 2
    assert samples[("caas_crypto_store_errors_total", ())] == 0
    assert samples[("caas_crypto_build_info", (("python", platform.python_version()), ("version", __version__)))] == 1
    assert samples[("process_resident_memory_bytes", ())] > 0 and samples[("process_open_fds", ())] > 0
    assert ("python_info", ()) not in samples  # labelled: implementation, major, minor, ...
    assert any(name == "python_info" for name, _ in samples)
    assert not any("t1" in str(labels) or key.key_id in str(labels) for _, labels in samples), "no tenant labels"


def test_metrics_are_off_unless_a_port_is_set(start_server: StartServer) -> None:
    assert start_server().running.metrics_port is None
