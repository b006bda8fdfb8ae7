"""Recovery after an outage does not grow with the outage (issue 10, defect 7).

gRPC's reconnect back-off grows to 120 s while a server is down, and the breaker probes once per cool-down:
a probe sent while the channel waits out its back-off fails at once and re-opens the circuit, so recovery
took 4.8 s after a 35 s outage and 30.2 s after 90 s. Now the back-off is capped
(`ClientConfig.max_reconnect_backoff_s`, 1 s) and the breaker lets the next call probe as soon as the
channel is READY again. Shown with a real server process killed and restarted on its port, after outages
of 3 s and 12 s (at 12 s gRPC's own back-off would already be 6.5 s, and the breaker's cool-down is 10 s).
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import Callable

import pytest

from crypto_client import AsyncCryptoClient, BreakerPolicy, ClientConfig, CryptoClient, CryptoClientError, RetryPolicy
from tests.conftest import Launch

# Everything a client does with its defaults but the number of attempts (each failed call then costs one).
CONFIG = ClientConfig(timeout_s=1.0, retry=RetryPolicy(max_attempts=1), breaker=BreakerPolicy(reset_timeout_s=10.0))
RECOVERY_BOUND_S = 2.5  # "within ~2 s of the server returning"


def test_the_blocking_client_recovers_within_two_seconds_whatever_the_outage_length(launch: Launch) -> None:
    root_key = base64.b64encode(os.urandom(32)).decode()
    servers = [launch(CRYPTO_ROOT_KEY=root_key)]
    port = str(servers[0].port)
    recoveries: dict[float, float] = {}
    with CryptoClient(servers[0].address, "acme", CONFIG) as crypto:
        key_id = crypto.create_key().key_id
        for outage_s in (3.0, 12.0):
            servers[-1].kill()
            recoveries[outage_s] = _recovery_after(
                outage_s,
                lambda: crypto.encrypt(key_id, b"x"),
                lambda: servers.append(launch(CRYPTO_ROOT_KEY=root_key, CRYPTO_PORT=port)),
            )
            assert crypto.stats().breaker_state == "closed"
    assert all(seconds < RECOVERY_BOUND_S for seconds in recoveries.values()), recoveries


def test_the_asyncio_client_recovers_within_two_seconds(launch: Launch) -> None:
    root_key = base64.b64encode(os.urandom(32)).decode()
    server = launch(CRYPTO_ROOT_KEY=root_key)
    port = str(server.port)

    async def scenario() -> float:
        async with AsyncCryptoClient(server.address, "acme", CONFIG) as crypto:
            key_id = (await crypto.create_key()).key_id
            loop = asyncio.get_running_loop()
            server.kill()

            def encrypt() -> object:
                return asyncio.run_coroutine_threadsafe(crypto.encrypt(key_id, b"x"), loop).result(timeout=5)

            return await asyncio.to_thread(
                _recovery_after, 3.0, encrypt, lambda: launch(CRYPTO_ROOT_KEY=root_key, CRYPTO_PORT=port)
            )

    assert asyncio.run(scenario()) < RECOVERY_BOUND_S


def _recovery_after(outage_s: float, encrypt: Callable[[], object], restart: Callable[[], object]) -> float:
    """With the server down: keep calling for `outage_s`, restart the server on its port, and return the
    seconds from the restarted server serving to the first successful call."""

    def call_until(give_up_at: float) -> bool:
        while time.monotonic() < give_up_at:
            try:
                encrypt()
                return True
            except CryptoClientError:
                time.sleep(0.02)  # the pace of a caller's traffic, not a wait for time to pass
        return False

    assert not call_until(time.monotonic() + outage_s), "a call succeeded with the server down"
    restart()
    serving = time.monotonic()
    if not call_until(serving + 15):
        pytest.fail("the client did not recover within 15 s")
    return time.monotonic() - serving
