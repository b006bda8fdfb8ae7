"""Resource limits (issue 16, findings 1 and 4): idle streams cannot take the server down, tenants have
quotas, and no response can exceed the send limit — with the status the caller got in the log and metrics.

The limits live in the transport and middleware, the same whatever the store: these tests run on the
embedded store only.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc
from crypto_server.domain.errors import CryptoServiceError
from crypto_server.transport import access_log
from crypto_server.transport.crypto_servicer import MAX_STREAM_RESPONSE_BYTES
from crypto_server.transport.middleware import RpcLimits, RpcMiddleware, add_service
from crypto_server.transport.streams import StreamSlots
from tests.conftest import ServerHandle, StartServer, expect_error
from tests.waiting import eventually

TENANT = "tenant-limits"


@pytest.fixture
def backend() -> str:
    return "embedded"


class HeldStream:
    """An EncryptStream that sends its first message, then nothing until released."""

    def __init__(self, handle: ServerHandle, key_id: str, tenant_id: str = TENANT) -> None:
        self.release = threading.Event()
        first = crypto_pb.EncryptStreamRequest(tenant_id=tenant_id, key_id=key_id)

        def requests() -> Iterator[crypto_pb.EncryptStreamRequest]:
            yield first
            self.release.wait(30)

        self.call: Any = handle.crypto.EncryptStream(requests(), timeout=30)

    def first_response(self) -> crypto_pb.EncryptStreamResponse | grpc.RpcError:
        try:
            response: crypto_pb.EncryptStreamResponse = next(self.call)
            return response
        except grpc.RpcError as error:
            return error

    def end(self) -> None:
        self.release.set()
        self.call.cancel()


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return str(info.reason)
    return ""


def _retry_delay_s(error: grpc.RpcError) -> float:
    status = rpc_status.from_call(error)
    assert status is not None
    for detail in status.details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo detail")


class AccessRecords:
    """What the access log was asked to write: (method, status) per call."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def record(self, method: str, tenant_id: str, key_id: str, code: str, duration_ms: float, request_id: str) -> None:
        self.lines.append((method, code))

    def codes(self, method: str) -> list[str]:
        return [code for logged, code in list(self.lines) if logged == method]


@pytest.fixture
def access_records(monkeypatch: pytest.MonkeyPatch) -> AccessRecords:
    """The access log, on and collected (set before the server is built: it reads `enabled` then)."""
    records = AccessRecords()
    monkeypatch.setattr(access_log, "enabled", lambda: True)
    monkeypatch.setattr(access_log, "record", records.record)
    return records


def test_idle_streams_leave_unary_calls_and_health_answering(
    start_server: StartServer, access_records: AccessRecords
) -> None:
    # Before the fix: 16 silent streams held all 16 workers and everything else timed out.
    handle = start_server(workers=8, max_concurrent_rpcs=512)
    key_id = handle.create_key(TENANT).key_id
    health = health_pb2_grpc.HealthStub(handle.channel)
    streams = [HeldStream(handle, key_id) for _ in range(64)]
    try:
        outcomes = [stream.first_response() for stream in streams]
        accepted = [o for o in outcomes if isinstance(o, crypto_pb.EncryptStreamResponse)]
        refused = [o for o in outcomes if isinstance(o, grpc.RpcError)]
        assert len(accepted) == 2  # a quarter of the 8 workers
        assert len(refused) == 62
        assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert {_reason(e) for e in refused} == {"ERROR_REASON_STREAM_LIMIT"}
        assert "CRYPTO_MAX_STREAMS" in (refused[0].details() or "")

        latencies = []
        for _ in range(5):
            started = time.perf_counter()
            handle.crypto.Encrypt(
                crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=key_id, plaintext=b"still served"), timeout=1.0
            )
            health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
            latencies.append(time.perf_counter() - started)
        # The issue asks for 100 ms; on a shared 2-core machine allow a margin, but far under the 5 s it took.
        assert max(latencies) < 1.0, latencies
    finally:
        for stream in streams:
            stream.end()
    eventually(
        lambda: access_records.codes("/caas.crypto.v1.CryptoService/EncryptStream").count("CANCELLED") >= 2,
        timeout_s=10,
        what="both accepted streams logged CANCELLED",
    )
    assert access_records.codes("/caas.crypto.v1.CryptoService/EncryptStream").count("RESOURCE_EXHAUSTED") == 62


def test_a_stream_slot_is_given_back_when_the_stream_ends(start_server: StartServer) -> None:
    handle = start_server(max_streams=1)
    key_id = handle.create_key(TENANT).key_id
    for _ in range(3):
        chunks = list(
            handle.crypto.EncryptStream(
                iter([crypto_pb.EncryptStreamRequest(tenant_id=TENANT, key_id=key_id, chunk=b"x")])
            )
        )
        assert len(chunks) >= 2


def _stream_readers() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == "stream-reader")


def test_a_silent_stream_is_ended_after_the_idle_timeout_and_frees_its_slot(
    start_server: StartServer, access_records: AccessRecords
) -> None:
    handle = start_server(max_streams=1, stream_idle_timeout_s=0.2)
    key_id = handle.create_key(TENANT).key_id
    silent = HeldStream(handle, key_id)
    try:
        assert isinstance(silent.first_response(), crypto_pb.EncryptStreamResponse)
        with pytest.raises(grpc.RpcError) as ended:
            next(silent.call)
        error = ended.value
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _reason(error) == "ERROR_REASON_STREAM_IDLE"
        assert "CRYPTO_STREAM_IDLE_TIMEOUT" in (error.details() or "")
    finally:
        silent.end()
    # Its slot (the only one) is free again, and its reader thread has left.
    chunks = list(handle.crypto.EncryptStream(iter([crypto_pb.EncryptStreamRequest(tenant_id=TENANT, key_id=key_id)])))
    assert chunks
    eventually(lambda: _stream_readers() == 0, timeout_s=10, what="the stream reader threads gone")
    assert "DEADLINE_EXCEEDED" in access_records.codes("/caas.crypto.v1.CryptoService/EncryptStream")


def test_a_tenant_over_its_quota_is_told_when_to_retry_and_others_are_unaffected(start_server: StartServer) -> None:
    # A rate so slow nothing refills during the test: the burst is all each tenant gets.
    handle = start_server(tenant_rate=0.001, tenant_burst=4, max_batch_items=4)
    greedy = handle.create_key("tenant-greedy").key_id  # 1 token
    for _ in range(3):
        handle.encrypt("tenant-greedy", greedy, b"x")  # 3 more
    error = expect_error(
        lambda: handle.encrypt("tenant-greedy", greedy, b"x"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ERROR_REASON_TENANT_QUOTA",
    )
    assert 500 < _retry_delay_s(error) <= 1000  # one token at 0.001 per second
    other = handle.create_key("tenant-other").key_id
    handle.encrypt("tenant-other", other, b"x")
    # A batch costs one token per item: 1 (CreateKey) + 1 (Encrypt) + 2 items = the burst of 4.
    items = [crypto_pb.BatchEncryptRequest.Item(key_id=other, plaintext=b"x")] * 2
    handle.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id="tenant-other", items=items))
    expect_error(
        lambda: handle.encrypt("tenant-other", other, b"x"),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ERROR_REASON_TENANT_QUOTA",
    )


def test_a_batch_over_the_byte_limit_is_refused_naming_the_limit(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    # The batch of the finding: 16,776,745 bytes, whose answer could not be sent (and was logged OK).
    items = [crypto_pb.BatchEncryptRequest.Item(key_id=key_id, plaintext=b"\0" * 16_000)] * 1000
    error = expect_error(
        lambda: server.crypto.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id=TENANT, items=items)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ERROR_REASON_INVALID_FIELD",
        field_name="items",
    )
    assert str(server.settings.max_batch_bytes) in (error.details() or "")


def test_the_largest_batch_allowed_is_answered(server: ServerHandle) -> None:
    key_id = server.create_key(TENANT).key_id
    each = server.settings.max_batch_bytes // server.settings.max_batch_items
    items = [crypto_pb.BatchEncryptRequest.Item(key_id=key_id, plaintext=os.urandom(each))] * 1000
    limit = server.settings.message_limit_bytes
    with grpc.insecure_channel(server.address, options=[("grpc.max_receive_message_length", limit)]) as channel:
        stub = crypto_service_pb2_grpc.CryptoServiceStub(channel)
        response = stub.BatchEncrypt(crypto_pb.BatchEncryptRequest(tenant_id=TENANT, items=items))
    assert len(response.results) == 1000 and all(r.ciphertext for r in response.results)


def test_large_stream_chunks_come_back_in_bounded_responses_and_round_trip(server: ServerHandle) -> None:
    # The finding: one ~16 MiB EncryptStream message produced a response over the send limit.
    key_id = server.create_key(TENANT).key_id
    plaintext = os.urandom(15 * 1024 * 1024)
    sealed = list(
        server.crypto.EncryptStream(
            iter([crypto_pb.EncryptStreamRequest(tenant_id=TENANT, key_id=key_id, chunk=plaintext)])
        )
    )
    assert all(len(r.chunk) <= MAX_STREAM_RESPONSE_BYTES for r in sealed)
    assert len(sealed) > 7
    ciphertext = b"".join(r.chunk for r in sealed)
    opened = list(
        server.crypto.DecryptStream(
            iter(
                [
                    crypto_pb.DecryptStreamRequest(tenant_id=TENANT, chunk=ciphertext[: 12 * 1024 * 1024]),
                    crypto_pb.DecryptStreamRequest(chunk=ciphertext[12 * 1024 * 1024 :]),
                ]
            )
        )
    )
    assert all(len(r.chunk) <= MAX_STREAM_RESPONSE_BYTES for r in opened)
    assert b"".join(r.chunk for r in opened) == plaintext


class _RecordingObserver:
    def __init__(self) -> None:
        self.codes: list[str] = []

    def for_method(self, method: str) -> Callable[[str, float], None]:
        def finished(code: str, seconds: float) -> None:
            self.codes.append(code)

        return finished

    def failed(self, error: CryptoServiceError) -> None:
        return None


class _LargeAnswers:
    """Every CryptoService method answers as Encrypt does: too large to send under a 1 KiB limit."""

    def __getattr__(self, name: str) -> Any:
        return self.Encrypt

    def Encrypt(self, request: crypto_pb.EncryptRequest, context: grpc.ServicerContext) -> crypto_pb.EncryptResponse:
        return crypto_pb.EncryptResponse(ciphertext=b"\0" * 4096)


def test_a_response_over_the_send_limit_is_logged_and_counted_as_the_caller_saw_it(
    access_records: AccessRecords,
) -> None:
    observer = _RecordingObserver()
    limits = RpcLimits(streams=StreamSlots(1), max_response_bytes=1024)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=[("grpc.max_send_message_length", 1024)])
    descriptor = crypto_pb.DESCRIPTOR.services_by_name["CryptoService"]
    add_service(server, descriptor, _LargeAnswers(), RpcMiddleware(observer=observer, limits=limits))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = crypto_service_pb2_grpc.CryptoServiceStub(channel)
            expect_error(
                lambda: stub.Encrypt(crypto_pb.EncryptRequest(tenant_id=TENANT), timeout=5),
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "ERROR_REASON_RESPONSE_TOO_LARGE",
            )
    finally:
        server.stop(0).wait()
    assert observer.codes == ["RESOURCE_EXHAUSTED"]
    assert access_records.codes("/caas.crypto.v1.CryptoService/Encrypt") == ["RESOURCE_EXHAUSTED"]
