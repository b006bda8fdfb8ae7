"""The client against a real server (127.0.0.1, port 0) with injected faults; run for sync and asyncio."""

from __future__ import annotations

import logging
import os
import threading
from datetime import timedelta

import grpc
import pytest

from crypto_client import (
    BreakerPolicy,
    CircuitOpenError,
    CryptoClientError,
    DeadlineExceededError,
    DecryptionError,
    HealthStatus,
    InvalidArgumentError,
    KeyAlreadyExistsError,
    KeyDisabledError,
    KeyNotFoundError,
    KeyState,
    KeyType,
    RetryPolicy,
    ServiceUnavailableError,
)
from crypto_client._core import ClientCore
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.client.conftest import MakeClient
from tests.client.faults import Fault, FaultInjector
from tests.conftest import ServerHandle, StartServer, Ticks
from tests.waiting import eventually

UNAVAILABLE = Fault(code=grpc.StatusCode.UNAVAILABLE)


def test_the_common_case_is_one_line_each(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key(labels={"team": "messaging"})
    assert key.key_type is KeyType.DATA and key.state is KeyState.ENABLED and key.labels == {"team": "messaging"}
    sealed = crypto.encrypt(key.key_id, b"hello", aad=b"conv-1")
    opened = crypto.decrypt(sealed.ciphertext, aad=b"conv-1")
    assert (opened.plaintext, opened.key_id, opened.key_version) == (b"hello", key.key_id, 1)
    assert crypto.rotate_key(key.key_id).primary_version == 2
    assert crypto.disable_key(key.key_id).state is KeyState.DISABLED
    assert crypto.enable_key(key.key_id).state is KeyState.ENABLED
    assert crypto.health() is HealthStatus.SERVING
    assert crypto.health("caas.crypto.v1.KeyService") is HealthStatus.SERVING


def test_update_key_changes_only_what_it_is_given(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key(labels={"team": "a"})
    assert key.next_rotation_at == key.created_at + timedelta(days=90)
    updated = crypto.update_key(key.key_id, rotation_period=timedelta(hours=1))
    assert updated.rotation_period == timedelta(hours=1) and updated.labels == {"team": "a"}
    assert updated.next_rotation_at == key.created_at + timedelta(hours=1)
    cleared = crypto.update_key(key.key_id, rotation_period=None, labels={"team": "b"})
    assert (cleared.rotation_period, cleared.next_rotation_at, cleared.labels) == (None, None, {"team": "b"})
    assert crypto.get_key(key.key_id, use_cache=False).labels == {"team": "b"}


def test_list_keys_iterates_over_every_page(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    created = {crypto.create_key().key_id for _ in range(7)}
    listed = list(crypto.list_keys(key_type=KeyType.DATA, page_size=2))
    assert {key.key_id for key in listed} == created
    assert faulty_server.running.in_flight is not None
    assert len(list(crypto.list_keys(page_size=3))) == 8  # with the master key


def test_two_transient_unavailable_then_success_takes_three_attempts(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    faults.plan("Encrypt", UNAVAILABLE, UNAVAILABLE)
    before = faults.attempts["Encrypt"]
    assert crypto.encrypt(key.key_id, b"x").key_version == 1
    assert faults.attempts["Encrypt"] - before == 3
    assert crypto.stats().retries == 2


def test_a_call_has_one_request_id_on_every_attempt_and_each_call_its_own(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    faults.plan("Encrypt", UNAVAILABLE, UNAVAILABLE)  # the first attempt fails outside tenacity, the second in it
    crypto.encrypt(key.key_id, b"x")
    crypto.encrypt(key.key_id, b"y")
    first, second, third, other = faults.request_ids["Encrypt"][-4:]
    assert first == second == third != other
    assert first and other


def test_request_ids_differ_in_a_forked_child() -> None:
    parent = ClientCore.call_metadata()[0][1]
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child process: write its id, then leave whatever happens
        try:
            os.write(writer, ClientCore.call_metadata()[0][1].encode())
        finally:
            os._exit(0)
    os.close(writer)
    _, wait_status = os.waitpid(child, 0)
    with os.fdopen(reader) as pipe:
        in_child = pipe.read()
    assert os.waitstatus_to_exitcode(wait_status) == 0
    assert in_child, "the child wrote no request id"
    # A prefix per process and a counter: the child's first id shares neither with the parent's ids.
    assert in_child.rsplit("-", 1)[0] != parent.rsplit("-", 1)[0]
    assert ClientCore.call_metadata()[0][1] != parent


def test_retries_stop_at_max_attempts_with_the_typed_error(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address, retry=RetryPolicy(max_attempts=3))
    key = crypto.create_key()
    faults.plan("Encrypt", *[UNAVAILABLE] * 5)
    before = faults.attempts["Encrypt"]
    with pytest.raises(ServiceUnavailableError) as caught:
        crypto.encrypt(key.key_id, b"x")
    assert faults.attempts["Encrypt"] - before == 3
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert "injected" in caught.value.details


def test_invalid_argument_is_one_attempt_and_a_typed_error(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    before = faults.attempts["Encrypt"]
    with pytest.raises(InvalidArgumentError) as caught:
        crypto.encrypt(key.key_id, b"x", aad=b"a" * 70_000)
    assert faults.attempts["Encrypt"] - before == 1
    error = caught.value
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT
    assert error.reason == "ERROR_REASON_INVALID_FIELD"
    assert error.field == "aad"
    assert isinstance(error, CryptoClientError)


def test_caller_errors_are_typed_and_never_retried(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    sealed = crypto.encrypt(crypto.create_key().key_id, b"x").ciphertext
    crypto.disable_key(key.key_id)
    attempts = sum(faults.attempts.values())
    cases: list[tuple[type[CryptoClientError], object]] = [
        (KeyDisabledError, lambda: crypto.encrypt(key.key_id, b"x")),
        (KeyNotFoundError, lambda: crypto.get_key("00000000-0000-4000-8000-000000000000")),
        (DecryptionError, lambda: crypto.decrypt(b"\x01" + sealed[1:-1])),
        (KeyAlreadyExistsError, lambda: crypto.create_key(KeyType.MASTER)),
    ]
    for kind, call in cases:
        with pytest.raises(kind):
            call()  # type: ignore[operator]
    assert sum(faults.attempts.values()) - attempts == len(cases)
    assert crypto.stats().retries == 0


def test_a_retried_create_key_whose_response_was_lost_creates_one_key(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    crypto.create_key()  # the master key exists; only the data key is at stake
    faults.plan("CreateKey", Fault(lose_response=True))
    key = crypto.create_key(labels={"attempt": "lost"})
    assert faults.attempts["CreateKey"] == 3
    data_keys = [k for k in crypto.list_keys(key_type=KeyType.DATA) if k.labels == {"attempt": "lost"}]
    assert [k.key_id for k in data_keys] == [key.key_id]


def test_a_retried_rotation_whose_response_was_lost_adds_one_version(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    faults.plan("RotateKey", Fault(lose_response=True))
    rotated = crypto.rotate_key(key.key_id)
    assert rotated.primary_version == 2
    assert [v.version for v in crypto.iter_key_versions(key.key_id)] == [1, 2]


def test_a_server_slower_than_the_deadline_surfaces_deadline_exceeded_in_time(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    answer = threading.Event()
    faults.plan("Encrypt", Fault(hold=answer))
    try:
        with pytest.raises(DeadlineExceededError) as caught:
            crypto.encrypt(key.key_id, b"x", timeout=0.2)
        assert faults.held == 1, "the caller is told at its deadline, while the server still holds the call"
    finally:
        answer.set()
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_an_attempt_timeout_lets_a_slow_attempt_be_retried_within_the_deadline(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address, retry=RetryPolicy(attempt_timeout_s=0.2))
    key = crypto.create_key()
    answer = threading.Event()
    faults.plan("Encrypt", Fault(hold=answer))  # the first attempt hangs until the end of the test
    try:
        assert crypto.encrypt(key.key_id, b"x", timeout=3).key_version == 1
        assert faults.attempts["Encrypt"] == 2
    finally:
        answer.set()


def test_the_breaker_opens_fails_fast_without_the_network_and_recovers_by_itself(
    start_server: StartServer, make_client: MakeClient
) -> None:
    server = start_server()
    port = server.running.port
    ticks = Ticks()
    crypto = make_client(
        server.address,
        retry=RetryPolicy(max_attempts=1),
        breaker=BreakerPolicy(failure_threshold=3, reset_timeout_s=10.0),
        timeout_s=1.0,
        clock=ticks,
    )
    key = crypto.create_key()
    crypto.encrypt(key.key_id, b"warm")
    server.stop()
    for _ in range(3):
        with pytest.raises(ServiceUnavailableError) as transport:
            crypto.encrypt(key.key_id, b"x")
        assert not isinstance(transport.value, CircuitOpenError)
    assert crypto.stats().breaker_state == "open"
    attempts = crypto.stats().attempts
    for _ in range(20):
        with pytest.raises(CircuitOpenError):
            crypto.encrypt(key.key_id, b"x")
    assert crypto.stats().attempts == attempts, "an open circuit sends nothing"
    assert crypto.stats().rejected_by_breaker == 20

    start_server(port=port)
    ticks.now += 10.0  # the reset timeout: the next call is a probe

    def encrypts() -> bool:
        try:
            return bool(crypto.encrypt(key.key_id, b"back").key_version == 1)
        except (CircuitOpenError, ServiceUnavailableError):
            return False

    # The channel's reconnection to the restarted server runs in real time (gRPC's own back-off).
    eventually(encrypts, timeout_s=10, what="the client recovering")
    assert crypto.stats().breaker_state == "closed"


def test_service_errors_do_not_open_the_breaker(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address, breaker=BreakerPolicy(failure_threshold=2))
    for _ in range(5):
        with pytest.raises(KeyNotFoundError):
            crypto.encrypt("00000000-0000-4000-8000-000000000000", b"x")
    assert crypto.stats().breaker_state == "closed"


def test_get_key_is_cached_and_the_clients_own_changes_invalidate_it(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(faulty_server.address, key_cache_ttl_s=60)
    key = crypto.create_key()
    crypto.get_key(key.key_id)
    before = faults.attempts["GetKey"]
    assert crypto.get_key(key.key_id).primary_version == 1
    assert faults.attempts["GetKey"] == before, "served from the cache"
    crypto.rotate_key(key.key_id)
    assert crypto.get_key(key.key_id).primary_version == 2
    crypto.disable_key(key.key_id)
    assert crypto.get_key(key.key_id).state is KeyState.DISABLED
    assert crypto.stats().cache_hits == 1


def test_get_key_cache_expires(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    ticks = Ticks()
    crypto = make_client(faulty_server.address, key_cache_ttl_s=5.0, clock=ticks)
    key = crypto.create_key()
    crypto.get_key(key.key_id)
    faulty_server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key.key_id))
    ticks.now += 4.9
    assert crypto.get_key(key.key_id).primary_version == 1, "within its lifetime the entry answers"
    ticks.now += 0.1
    assert crypto.get_key(key.key_id).primary_version == 2, "at its lifetime the entry is gone"


def test_session_keys_and_policies_are_passed_through(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key(KeyType.SESSION, expire_after=timedelta(hours=2), rotation_period=timedelta(days=1))
    assert key.key_type is KeyType.SESSION
    assert key.expires_at is not None and key.expires_at - key.created_at == timedelta(hours=2)
    assert key.rotation_period == timedelta(days=1)
    listed = list(crypto.list_keys(key_type=KeyType.SESSION, state=KeyState.ENABLED))
    assert [k.key_id for k in listed] == [key.key_id]
    stored = faulty_server.keys.GetKey(key_pb.GetKeyRequest(tenant_id="acme", key_id=key.key_id)).key
    assert stored.key_type == resources_pb2.KEY_TYPE_SESSION, "the request carried the session key type"


def test_an_invalid_tenant_or_config_fails_at_construction(make_client: MakeClient) -> None:
    with pytest.raises(ValueError, match="tenant_id"):
        make_client("127.0.0.1:1", tenant_id="bad tenant")
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match="failure_threshold"):
        BreakerPolicy(failure_threshold=0)


def test_retries_are_logged(
    faulty_server: ServerHandle,
    faults: FaultInjector,
    make_client: MakeClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    caplog.set_level(logging.INFO, logger="crypto_client")
    faults.plan("Encrypt", UNAVAILABLE)
    crypto.encrypt(key.key_id, b"x")
    retries = [r for r in caplog.records if r.getMessage().startswith("retrying Encrypt after UNAVAILABLE")]
    assert len(retries) == 1
    stats = crypto.stats()
    assert (stats.calls, stats.retries, stats.failures) == (2, 1, 0)
    assert stats.attempts == 3


def test_the_breaker_counts_calls_not_attempts(
    faulty_server: ServerHandle, faults: FaultInjector, make_client: MakeClient
) -> None:
    crypto = make_client(
        faulty_server.address,
        retry=RetryPolicy(max_attempts=4, initial_backoff_s=0.001, max_backoff_s=0.002),
        breaker=BreakerPolicy(failure_threshold=5, reset_timeout_s=60),
    )
    key = crypto.create_key()
    faults.plan("Encrypt", UNAVAILABLE, UNAVAILABLE, UNAVAILABLE)
    crypto.encrypt(key.key_id, b"x")  # three failed attempts, then an answer: a successful call
    faults.plan("Encrypt", *[UNAVAILABLE] * 20)
    before = faults.attempts["Encrypt"]
    for calls in range(1, 5):
        with pytest.raises(ServiceUnavailableError) as caught:
            crypto.encrypt(key.key_id, b"x")
        assert not isinstance(caught.value, CircuitOpenError)
        assert crypto.stats().breaker_state == "closed", f"open after {calls} failed calls ({calls * 4} attempts)"
    with pytest.raises(ServiceUnavailableError):
        crypto.encrypt(key.key_id, b"x")  # the fifth failed call
    assert crypto.stats().breaker_state == "open"
    assert faults.attempts["Encrypt"] - before == 5 * 4, "every failed call used all its attempts"
    with pytest.raises(CircuitOpenError):
        crypto.encrypt(key.key_id, b"x")
    assert faults.attempts["Encrypt"] - before == 20
