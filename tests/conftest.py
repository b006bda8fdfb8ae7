"""Shared fixtures: a real server on 127.0.0.1 (port 0) with an injected clock."""

from __future__ import annotations

import base64
import itertools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc, resources_pb2
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.app import CryptoServer, build_server
from crypto_server.config import Settings
from tests.servers import (
    SOFTHSM_LIBRARIES,
    CryptoServerProcess,
    MongoServer,
    RedisServer,
    ServerProcess,
    SoftHsm,
    find_softhsm_library,
)


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 1, tzinfo=UTC)
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            return self._now

    def advance(self, delta: timedelta) -> None:
        with self._lock:
            self._now += delta


class Ticks:
    """A monotonic clock (seconds, a float) that moves only when a test moves `now`."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


@dataclass
class ServerHandle:
    running: CryptoServer
    channel: grpc.Channel
    clock: FakeClock
    settings: Settings
    keys: key_service_pb2_grpc.KeyServiceStub = field(init=False)
    crypto: crypto_service_pb2_grpc.CryptoServiceStub = field(init=False)

    def __post_init__(self) -> None:
        self.keys = key_service_pb2_grpc.KeyServiceStub(self.channel)
        self.crypto = crypto_service_pb2_grpc.CryptoServiceStub(self.channel)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def create_key(
        self, tenant_id: str, key_type: int = resources_pb2.KEY_TYPE_DATA, **fields: Any
    ) -> resources_pb2.Key:
        response = self.keys.CreateKey(key_pb.CreateKeyRequest(tenant_id=tenant_id, key_type=key_type, **fields))
        return response.key

    def encrypt(self, tenant_id: str, key_id: str, plaintext: bytes, aad: bytes = b"") -> crypto_pb.EncryptResponse:
        return self.crypto.Encrypt(
            crypto_pb.EncryptRequest(tenant_id=tenant_id, key_id=key_id, plaintext=plaintext, aad=aad)
        )

    def decrypt(
        self, tenant_id: str, ciphertext: bytes, aad: bytes = b"", key_id: str = ""
    ) -> crypto_pb.DecryptResponse:
        return self.crypto.Decrypt(
            crypto_pb.DecryptRequest(tenant_id=tenant_id, ciphertext=ciphertext, aad=aad, key_id=key_id)
        )

    def versions(self, tenant_id: str, key_id: str) -> list[resources_pb2.KeyVersion]:
        return every_version(self.keys, tenant_id, key_id)

    def stop(self) -> None:
        self.channel.close()
        self.running.stop(0)


def every_version(
    keys: key_service_pb2_grpc.KeyServiceStub, tenant_id: str, key_id: str
) -> list[resources_pb2.KeyVersion]:
    """Every version of a key, oldest first, through ListKeyVersions (GetKey's key holds only its primary and the
    versions with a state of their own)."""
    versions: list[resources_pb2.KeyVersion] = []
    token = ""
    while True:
        page = keys.ListKeyVersions(
            key_pb.ListKeyVersionsRequest(tenant_id=tenant_id, key_id=key_id, page_size=1000, page_token=token)
        )
        versions.extend(page.versions)
        token = page.next_page_token
        if not token:
            return versions


StartServer = Callable[..., ServerHandle]


def write_root_key_file(path: Path, key: str) -> Path:
    """A root key file as operators must keep one: readable by its owner only (the server refuses others)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as key_file:
        key_file.write(key + "\n")
    return path


@pytest.fixture
def root_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


_Server = TypeVar("_Server", bound=ServerProcess)


def _running(server: _Server) -> Iterator[_Server]:
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    yield from _running(RedisServer(tmp_path_factory.mktemp("redis")))


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    yield from _running(MongoServer(tmp_path_factory.mktemp("mongo")))


def _discarded(server: _Server) -> Iterator[_Server]:
    server.start()
    yield server
    server.discard()


# A test's own Redis and MongoDB, for tests that stop, freeze or kill them (the session's are shared). Their data
# dies with the test: killed at the end, not shut down.
@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    yield from _discarded(RedisServer(tmp_path / "own-redis"))


@pytest.fixture
def own_mongo(tmp_path: Path) -> Iterator[MongoServer]:
    yield from _discarded(MongoServer(tmp_path / "own-mongo"))


# The stores (and cache), with the root key from a file (the fixture `root_key`).
FILE_ROOT_BACKENDS = ["embedded", "mongo", "mongo+redis"]
# The same with the root key in a SoftHSM2 token (CRYPTO_ROOT_KEY_PROVIDER=pkcs11), on two of the stores.
HSM_BACKENDS = ["embedded+hsm", "mongo+redis+hsm"]
BACKENDS = FILE_ROOT_BACKENDS + HSM_BACKENDS


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """Which store (and cache) the server under test uses, and where its root key is; a behaviour test runs on
    each unless it does not depend on the store: then its module narrows `backend` (to one store, usually the
    embedded one) and says where the store's part is proven (tests/storage/test_contract*.py)."""
    name: str = request.param
    return name


@pytest.fixture(scope="session")
def softhsm(tmp_path_factory: pytest.TempPathFactory) -> SoftHsm:
    """A SoftHSM2 token holding root keys labelled "root" and "root-2", made by crypto-init-hsm.

    SoftHSM reads SOFTHSM2_CONF when this process first loads it, so the variable is set for the whole session
    (and the servers it starts); every in-process test shares this one configuration.
    """
    library = find_softhsm_library()
    if library is None:
        pytest.skip(f"SoftHSM2 is not installed ({' or '.join(SOFTHSM_LIBRARIES)}): apt-get install softhsm2")
    hsm = SoftHsm.create(tmp_path_factory.mktemp("softhsm"), library)
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    for label in (SoftHsm.ROOT_LABEL, SoftHsm.SECOND_LABEL):
        hsm.init_key(label)
    return hsm


_database_numbers = itertools.count()


@pytest.fixture
def backend_settings(backend: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Settings for `backend`: a fresh MongoDB database per test keeps collections small."""
    settings: dict[str, Any] = {}
    parts = backend.split("+")
    if "mongo" in parts:
        mongo: MongoServer = request.getfixturevalue("mongo_server")
        settings.update(mongodb_uri=mongo.uri, mongodb_database=f"test{os.getpid()}_{next(_database_numbers)}")
    if "redis" in parts:
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        settings.update(redis_url=redis_server.url)
    if "hsm" in parts:
        hsm: SoftHsm = request.getfixturevalue("softhsm")
        settings.update(root_key=None, **hsm.settings())
    return settings


@pytest.fixture
def start_server(tmp_path: Path, root_key: str, backend_settings: dict[str, Any]) -> Iterator[StartServer]:
    """Start servers on one store (data directory or database) and root key; all are stopped at the end."""
    started: list[ServerHandle] = []

    def start(
        clock: FakeClock | None = None, interceptors: Sequence[grpc.ServerInterceptor] = (), **overrides: Any
    ) -> ServerHandle:
        # No rotation thread: it would run passes at real-time intervals against the injected clock; tests that
        # exercise automatic rotation call `running.rotator.run_once()` when they have moved the clock.
        settings = replace(
            Settings(
                host="127.0.0.1",
                port=0,
                workers=8,
                data_dir=tmp_path / "data",
                root_key=root_key,
                rotation_interval_s=0,
            ),
            **{**backend_settings, **overrides},
        )
        clock = clock or FakeClock()
        running = build_server(settings, clock=clock, interceptors=interceptors)
        handle = ServerHandle(running, grpc.insecure_channel(f"127.0.0.1:{running.port}"), clock, settings)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture
def server(start_server: StartServer) -> ServerHandle:
    return start_server()


def error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo:
    """The google.rpc.ErrorInfo attached to a failed call (fails the test if absent)."""
    status = rpc_status.from_call(error)
    assert status is not None, "the error carries no google.rpc.Status"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info
    raise AssertionError("the error carries no ErrorInfo")


def expect_error(
    call: Callable[[], object], code: grpc.StatusCode, reason: str, field_name: str | None = None
) -> grpc.RpcError:
    """Run `call`, which must fail with `code` and ErrorInfo `reason` (and metadata field, when given)."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    error = caught.value
    assert error.code() == code, f"{error.code()}: {error.details()}"
    info = error_info(error)
    assert info.reason == reason
    assert info.domain == "crypto.caas"
    if field_name is not None:
        assert info.metadata["field"] == field_name
        assert field_name in (error.details() or "")
    return error


Launch = Callable[..., CryptoServerProcess]


@pytest.fixture
def launch(tmp_path: Path) -> Iterator[Launch]:
    """Run `python -m crypto_server` processes (environment as keyword arguments); all are killed at the end."""
    started: list[CryptoServerProcess] = []

    def launch(**env: str) -> CryptoServerProcess:
        env.setdefault("CRYPTO_DATA_DIR", str(tmp_path / "data"))
        server = CryptoServerProcess.launch(env)
        started.append(server)
        return server

    yield launch
    for server in started:
        server.kill()
