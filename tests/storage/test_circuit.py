"""The store's circuit breaker and bulkhead tell a caller when to try again (a RetryInfo), so a client waits for
the next probe instead of spending its attempts on refusals (the failure seen in `make bench`: a store stall
under load opened the circuit and a setup call gave up 4 attempts later, while the circuit was about to probe)."""

from __future__ import annotations

import threading
from typing import cast

import pytest
from google.rpc import error_details_pb2, status_pb2

from crypto_server.domain.errors import StoreCallRefused, StoreUnavailable, StoreWriteRefused
from crypto_server.storage.circuit import StoreCircuit
from crypto_server.storage.port import KeyStore
from crypto_server.transport.errors import status_for


class _Store:
    """The one KeyStore method these tests call, `get_key`: failing or held as the test says."""

    def __init__(self) -> None:
        self.down = False
        self.unwritable = False
        self.broken = False
        self.hold: threading.Event | None = None
        self.inside = threading.Event()

    def get_key(self, tenant_id: str, key_id: str) -> None:
        self.inside.set()
        if self.hold is not None:
            self.hold.wait(timeout=10)
        if self.down:
            raise StoreUnavailable("the database did not answer")
        if self.unwritable:
            raise StoreWriteRefused("the disk is full")
        if self.broken:
            raise RuntimeError("a bug in the adapter")


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _retry_delay_s(error: StoreUnavailable) -> float:
    _, status = status_for(error, "request-1")
    rich = dict(status.trailing_metadata)["grpc-status-details-bin"]
    assert isinstance(rich, bytes)
    for detail in status_pb2.Status.FromString(rich).details:
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToNanoseconds()) / 1e9
    raise AssertionError("no RetryInfo detail")


def test_an_open_circuit_tells_callers_when_the_store_is_next_tried() -> None:
    store, clock = _Store(), _Clock()
    circuit = StoreCircuit(cast(KeyStore, store), max_concurrent=2, open_s=1.0, clock=clock)
    store.down = True
    with pytest.raises(StoreUnavailable) as first:
        circuit.get_key("t1", "k1")
    # The store's own failure: nobody knows when it is back, but the circuit tries it again in open_s, so that
    # is when the caller is told to retry (before, this failure carried no RetryInfo at all).
    assert not isinstance(first.value, StoreCallRefused), "it reached the store"
    assert first.value.retry_after_s == pytest.approx(1.0)
    assert _retry_delay_s(first.value) == pytest.approx(1.0)

    with pytest.raises(StoreCallRefused) as refused:
        circuit.get_key("t1", "k1")
    assert refused.value.retry_after_s == pytest.approx(1.0)
    assert _retry_delay_s(refused.value) == pytest.approx(1.0)

    clock.now += 0.6
    with pytest.raises(StoreUnavailable) as later:
        circuit.get_key("t1", "k1")
    assert later.value.retry_after_s == pytest.approx(0.4)
    assert _retry_delay_s(later.value) == pytest.approx(0.4)
    assert "next try in 0.40s" in later.value.message

    clock.now += 0.5  # past the wait: this call is the probe, and the store answers again
    store.down = False
    circuit.get_key("t1", "k1")
    circuit.get_key("t1", "k1")


def test_a_call_refused_by_the_bulkhead_is_told_to_retry_shortly() -> None:
    store = _Store()
    store.hold = threading.Event()
    circuit = StoreCircuit(cast(KeyStore, store), max_concurrent=1)
    holder = threading.Thread(target=circuit.get_key, args=("t1", "k1"))
    holder.start()
    try:
        assert store.inside.wait(timeout=5)
        with pytest.raises(StoreCallRefused) as refused:
            circuit.get_key("t1", "k1")  # waits a quarter of a second for the one place, then is refused
        assert refused.value.retry_after_s is not None and 0 < refused.value.retry_after_s <= 1.0
        assert _retry_delay_s(refused.value) == pytest.approx(refused.value.retry_after_s)
    finally:
        store.hold.set()
        holder.join(timeout=5)


def test_a_probe_that_finds_the_store_unwritable_lets_the_next_call_probe() -> None:
    # A full disk refuses writes (StoreWriteRefused) but serves reads: it must not leave the circuit "probing"
    # for ever, refusing every later call (found by review: only a successful health ping cleared the flag).
    store, clock = _Store(), _Clock()
    circuit = StoreCircuit(cast(KeyStore, store), max_concurrent=2, open_s=1.0, clock=clock)
    store.down = True
    with pytest.raises(StoreUnavailable):
        circuit.get_key("t1", "k1")  # opens the circuit
    clock.now += 1.5
    store.down, store.unwritable = False, True
    with pytest.raises(StoreWriteRefused) as unwritable:
        circuit.get_key("t1", "k1")  # the probe: the store answers, but cannot write
    assert _retry_delay_s(unwritable.value) == pytest.approx(1.0), "told when to try again, too"
    store.unwritable = False
    assert circuit.get_key("t1", "k1") is None  # the next call probes (not refused as "probing"), and closes it
    assert not circuit.is_open


def test_a_probe_that_fails_unexpectedly_lets_the_next_call_probe() -> None:
    store, clock = _Store(), _Clock()
    circuit = StoreCircuit(cast(KeyStore, store), max_concurrent=2, open_s=1.0, clock=clock)
    store.down = True
    with pytest.raises(StoreUnavailable):
        circuit.get_key("t1", "k1")
    clock.now += 1.5
    store.down, store.broken = False, True
    with pytest.raises(RuntimeError):
        circuit.get_key("t1", "k1")
    store.broken = False
    assert circuit.get_key("t1", "k1") is None
    assert not circuit.is_open
