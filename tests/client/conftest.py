"""Client tests: one suite, run against the blocking client and the asyncio client."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from crypto_client import AsyncCryptoClient, ClientConfig, CryptoClient
from tests.client.faults import FaultInjector
from tests.conftest import ServerHandle, StartServer

_T = TypeVar("_T")


@pytest.fixture
def backend() -> str:
    return "embedded"


class _EventLoopThread:
    """An event loop on its own thread, so one blocking test body can drive the asyncio client."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=60)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


class AsyncDriven:
    """An AsyncCryptoClient whose methods are called like CryptoClient's (each call runs on the loop)."""

    def __init__(self, loop: _EventLoopThread, target: str, tenant_id: str, config: ClientConfig) -> None:
        self._loop = loop

        async def create() -> AsyncCryptoClient:
            return AsyncCryptoClient(target, tenant_id, config)

        self.client = loop.run(create())

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.client, name)
        if name in ("list_keys", "iter_key_versions"):  # async iterators

            def collect(*args: Any, **kwargs: Any) -> Iterator[Any]:
                async def gather() -> list[Any]:
                    return [key async for key in attribute(*args, **kwargs)]

                return iter(self._loop.run(gather()))

            return collect
        if name in {"stats", "tenant_id"}:
            return attribute
        return lambda *args, **kwargs: self._loop.run(attribute(*args, **kwargs))

    def close(self) -> None:
        self._loop.run(self.client.close())


MakeClient = Callable[..., Any]


@pytest.fixture(params=["sync", "async"])
def make_client(request: pytest.FixtureRequest) -> Iterator[MakeClient]:
    """Build a client (sync or asyncio) for a target; all are closed at the end."""
    loop = _EventLoopThread() if request.param == "async" else None
    clients: list[Any] = []

    def make(target: str, tenant_id: str = "acme", **config: Any) -> Any:
        settings = ClientConfig(**config)
        client = (
            CryptoClient(target, tenant_id, settings)
            if loop is None
            else AsyncDriven(loop, target, tenant_id, settings)
        )
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()
    if loop is not None:
        loop.stop()


@pytest.fixture
def faults() -> FaultInjector:
    return FaultInjector()


@pytest.fixture
def faulty_server(start_server: StartServer, faults: FaultInjector) -> ServerHandle:
    return start_server(interceptors=[faults])
