"""The circuit breaker's state machine, on an injected clock."""

from __future__ import annotations

import logging

import pytest

from crypto_client import BreakerPolicy, BreakerState, CircuitOpenError
from crypto_client.breaker import CircuitBreaker
from tests.conftest import Ticks


@pytest.fixture
def ticks() -> Ticks:
    return Ticks(start=100.0)


@pytest.fixture
def breaker(ticks: Ticks) -> CircuitBreaker:
    return CircuitBreaker(BreakerPolicy(failure_threshold=3, reset_timeout_s=10), clock=ticks)


def _fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        breaker.before_call()
        breaker.record_failure()


def test_opens_after_the_threshold_of_consecutive_failures(breaker: CircuitBreaker) -> None:
    _fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()
    breaker.record_success()  # a success resets the count
    _fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    _fail(breaker, 1)
    assert breaker.state is BreakerState.OPEN
    with pytest.raises(CircuitOpenError, match=r"next probe in 10\.00s"):
        breaker.before_call()


def test_half_open_after_the_cool_down_lets_exactly_one_probe_through(breaker: CircuitBreaker, ticks: Ticks) -> None:
    _fail(breaker, 3)
    ticks.now += 9.99
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    ticks.now += 0.01
    breaker.before_call()  # the probe
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(CircuitOpenError, match="probe"):
        breaker.before_call()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED
    breaker.before_call()


def test_a_failed_probe_opens_again_for_a_full_cool_down(breaker: CircuitBreaker, ticks: Ticks) -> None:
    _fail(breaker, 3)
    ticks.now += 10
    breaker.before_call()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    ticks.now += 9
    with pytest.raises(CircuitOpenError):
        breaker.before_call()
    ticks.now += 1
    breaker.before_call()
    assert breaker.state is BreakerState.HALF_OPEN


def test_a_released_probe_frees_the_half_open_slot(breaker: CircuitBreaker, ticks: Ticks) -> None:
    _fail(breaker, 3)
    ticks.now += 10
    breaker.before_call()
    breaker.release()
    breaker.before_call()
    assert breaker.state is BreakerState.HALF_OPEN


def test_transitions_are_logged_and_reported(ticks: Ticks, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        BreakerPolicy(failure_threshold=1, reset_timeout_s=1),
        clock=ticks,
        on_transition=lambda a, b: seen.append((a, b)),
    )
    caplog.set_level(logging.INFO, logger="crypto_client.breaker")
    _fail(breaker, 1)
    ticks.now += 1
    breaker.before_call()
    breaker.record_success()
    assert seen == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]
    messages = [record.getMessage() for record in caplog.records]
    assert messages == ["circuit closed -> open", "circuit open -> half_open", "circuit half_open -> closed"]
    assert caplog.records[0].levelno == logging.WARNING
