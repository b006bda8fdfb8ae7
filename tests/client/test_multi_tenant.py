"""One client for many tenants: `tenant_id=` per call over one channel, tenants kept apart; run sync and asyncio."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from crypto_client import DecryptionError, KeyNotFoundError
from tests.client.conftest import MakeClient
from tests.conftest import ServerHandle, StartServer


class PeerRecorder(grpc.ServerInterceptor):
    """Records the peer (client address and port: one per TCP connection) and tenant of every unary call."""

    def __init__(self) -> None:
        self.peers: set[str] = set()
        self.tenants: set[str] = set()
        self._lock = threading.Lock()

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None:
            return handler
        behaviour = handler.unary_unary

        def recorded(request: Any, context: grpc.ServicerContext) -> Any:
            with self._lock:
                self.peers.add(context.peer())
                self.tenants.add(getattr(request, "tenant_id", ""))
            return behaviour(request, context)

        return grpc.unary_unary_rpc_method_handler(
            recorded, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _established_connections_to(port: int) -> int:
    """Established TCP connections to `port`, from the kernel's tables (client-side rows; gRPC uses IPv6
    sockets with IPv4-mapped addresses, so both tables are read)."""
    count = 0
    for table_path in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table_path) as table:
            for row in table.readlines()[1:]:
                fields = row.split()
                remote, state = fields[2], fields[3]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port:
                    count += 1
    return count


@pytest.fixture
def peers() -> PeerRecorder:
    return PeerRecorder()


@pytest.fixture
def recorded_server(start_server: StartServer, peers: PeerRecorder) -> ServerHandle:
    return start_server(interceptors=[peers])


def test_one_client_serves_100_tenants_over_one_connection(
    recorded_server: ServerHandle, peers: PeerRecorder, make_client: MakeClient
) -> None:
    crypto = make_client(recorded_server.address, tenant_id=None)
    tenants = [f"tenant-{n:03d}" for n in range(100)]
    for tenant in tenants:
        key = crypto.create_key(tenant_id=tenant)
        assert key.tenant_id == tenant
        sealed = crypto.encrypt(key.key_id, tenant.encode(), tenant_id=tenant)
        assert crypto.decrypt(sealed.ciphertext, tenant_id=tenant).plaintext == tenant.encode()
    assert peers.tenants == set(tenants)
    assert len(peers.peers) == 1, f"one channel, one connection; the server saw {sorted(peers.peers)}"
    # The test's own stub channel (ServerHandle.channel) is idle; the client's is the one connection open.
    assert _established_connections_to(recorded_server.running.port) == 1
    stats = crypto.stats()
    assert (stats.calls, stats.breaker_state) == (300, "closed")


def test_tenants_stay_apart_on_one_client(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address, tenant_id="acme", key_cache_ttl_s=60)
    key = crypto.create_key()
    assert crypto.get_key(key.key_id).tenant_id == "acme"  # now cached for acme
    with pytest.raises(KeyNotFoundError):
        crypto.get_key(key.key_id, tenant_id="globex")  # never answered from acme's cache entry
    sealed = crypto.encrypt(key.key_id, b"acme only").ciphertext
    with pytest.raises(DecryptionError):
        crypto.decrypt(sealed, tenant_id="globex")
    assert [k.tenant_id for k in crypto.list_keys(tenant_id="globex")] == []


def test_a_missing_or_malformed_tenant_is_refused_before_sending(
    faulty_server: ServerHandle, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address, tenant_id=None)
    assert crypto.tenant_id is None
    with pytest.raises(ValueError, match="no default tenant"):
        crypto.create_key()
    with pytest.raises(ValueError, match="tenant_id"):
        crypto.create_key(tenant_id="bad tenant")
    assert crypto.stats().calls == 0
