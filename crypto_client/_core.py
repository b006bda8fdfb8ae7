"""What the sync and asyncio clients share: tenants, deadlines, retries, the breaker, the key cache, counters.

The RPC methods themselves are declared once, in `crypto_client/_async/client.py`; the blocking client is
generated from them (`make unasync`). Everything here is free of I/O, so both flavours use it as is.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from typing import Any

import grpc
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.stop import stop_base

from crypto_client import _convert
from crypto_client.breaker import BreakerState, CircuitBreaker
from crypto_client.config import ClientConfig, check_tenant_id
from crypto_client.errors import CircuitOpenError, CryptoClientError, DeadlineExceededError, is_transport_failure
from crypto_client.key_cache import KeyMetadataCache
from crypto_client.metrics import ClientMetrics, ClientStats
from crypto_client.models import Key
from crypto_client.v1 import resources_pb2

log = logging.getLogger("crypto_client")


class _RequestIds:
    """Request ids for the server's log: a random prefix per process and a counter. Unique without a system call
    per call (os.urandom, behind uuid4, releases the GIL: a thread hand-off per call when threads share a client).
    They only correlate log lines, so they need not be unpredictable; a forked child takes a prefix of its own."""

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._numbers = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._numbers)}"


_request_ids = _RequestIds()
os.register_at_fork(after_in_child=_request_ids.renew)
REQUEST_ID_HEADER = "x-request-id"


class _PastDeadline(stop_base):
    """Stop retrying once the call's deadline has passed."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() >= self._deadline


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, CryptoClientError) and error.transient


class ClientCore:
    """One per client, that is per target: the default tenant, settings, counters, breaker and key cache.

    The breaker and the channel belong to the target, not to a tenant: one client serves any number of
    tenants (`tenant_id=` on each call) over one connection, and an outage opens one circuit for all of them.
    """

    def __init__(self, tenant_id: str | None, config: ClientConfig) -> None:
        self.default_tenant = None if tenant_id is None else check_tenant_id(tenant_id)
        self.config = config
        self.metrics = ClientMetrics()
        self.breaker = CircuitBreaker(
            config.breaker,
            clock=config.clock,
            on_transition=lambda _old, _new: self.metrics.add("breaker_transitions"),
        )
        self.key_cache = KeyMetadataCache(config.key_cache_ttl_s, config.key_cache_size, clock=config.clock)

    def tenant(self, tenant_id: str | None) -> str:
        """The tenant a call is for: its own `tenant_id`, else the client's default; checked before sending."""
        if tenant_id is not None:
            return check_tenant_id(tenant_id)
        if self.default_tenant is None:
            raise ValueError("this client has no default tenant: pass tenant_id= to the call")
        return self.default_tenant

    def channel_options(self) -> list[tuple[str, Any]]:
        config = self.config
        backoff_ms = int(config.max_reconnect_backoff_s * 1000)
        # gRPC's reconnect back-off grows to 120 s by default: after a long outage the channel would wait that
        # long before trying again, and every breaker probe in between would fail at once (issue 10, defect 7).
        # Capped, the channel is back within about max_reconnect_backoff_s of the server.
        # The caller's options come last, so they win over ours.
        return [
            ("grpc.max_receive_message_length", config.max_receive_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", min(backoff_ms, 1000)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
            *config.channel_options,
        ]

    # -- one call --------------------------------------------------------------

    def deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.config.timeout_s if timeout_s is None else timeout_s)

    @staticmethod
    def call_metadata() -> tuple[tuple[str, str], ...]:
        """One request id per call, the same on every attempt, for the server's log."""
        return ((REQUEST_ID_HEADER, _request_ids.next()),)

    def attempt_metadata(self, call_metadata: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
        """The call's metadata plus, with a token provider, a token fetched now (it may have been refreshed)."""
        provider = self.config.token_provider
        if provider is None:
            return call_metadata
        return (*call_metadata, ("authorization", f"Bearer {provider()}"))

    def retrying(self, method: str, deadline: float) -> dict[str, Any]:
        """tenacity options: transient errors only, exponential backoff with jitter, never past the deadline."""
        policy = self.config.retry
        # "Full jitter": a random wait up to the exponential bound, so clients that failed together
        # do not retry together.
        backoff = wait_random_exponential(multiplier=policy.initial_backoff_s, max=policy.max_backoff_s)

        def server_delay(state: RetryCallState) -> float:
            error = state.outcome.exception() if state.outcome else None
            return getattr(error, "retry_after_s", None) or 0.0

        def retryable(error: BaseException) -> bool:
            # A server that asks for a long wait (or one past the deadline) is not retried blindly.
            delay = getattr(error, "retry_after_s", None) or 0.0
            return _is_retryable(error) and delay <= policy.max_server_delay_s and time.monotonic() + delay < deadline

        def wait(state: RetryCallState) -> float:
            return max(0.0, min(max(backoff(state), server_delay(state)), deadline - time.monotonic()))

        def before_sleep(state: RetryCallState) -> None:
            self.metrics.add("retries")
            error = state.outcome.exception() if state.outcome else None
            log.info(
                "retrying %s after %s (attempt %d, waiting %.3fs)",
                method,
                error,
                state.attempt_number,
                state.upcoming_sleep,
                extra={"method": method, "attempt": state.attempt_number},
            )

        return {
            "retry": retry_if_exception(retryable),
            "stop": stop_after_attempt(policy.max_attempts) | _PastDeadline(deadline),
            "wait": wait,
            "before_sleep": before_sleep,
            "reraise": True,
        }

    def attempt_timeout(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceededError(
                "the call's deadline passed before it could be sent", code=grpc.StatusCode.DEADLINE_EXCEEDED
            )
        cap = self.config.retry.attempt_timeout_s
        return remaining if cap is None else min(remaining, cap)

    def admit(self) -> None:
        """Once per call, before its first attempt: the breaker lets it through or it fails fast."""
        self.metrics.add("calls")
        try:
            self.breaker.before_call()
        except CircuitOpenError:
            self.metrics.add("rejected_by_breaker")
            self.metrics.add("failures")
            raise

    def breaker_closed(self) -> bool:
        return self.breaker.state is BreakerState.CLOSED

    def ended(self, error: BaseException | None, *, sent: bool) -> None:
        """Once per admitted call, with how it ended: the breaker counts calls, not attempts.

        A call that exhausted its retries on transport failures is one failure; any answer from the
        service, even an error, is a success; a call cancelled or never sent says nothing about the service.
        """
        if error is None:
            self.breaker.record_success()
            return
        self.metrics.add("failures")
        if not sent or not isinstance(error, CryptoClientError):
            self.breaker.release()
        elif is_transport_failure(error):
            self.breaker.record_failure()
        else:
            self.breaker.record_success()

    def stats(self) -> ClientStats:
        return self.metrics.snapshot(self.breaker.state.value)

    # -- the key-metadata cache (per tenant: a key id never answers for another tenant) ----------

    def key_changed(self, tenant_id: str, message: resources_pb2.Key) -> Key:
        """A key from a create/rotate/disable/enable response; the cache must not serve its old state."""
        key = _convert.key_from_proto(message)
        self.key_cache.forget(tenant_id, key.key_id)
        return key

    def key_fetched(self, tenant_id: str, message: resources_pb2.Key) -> Key:
        key = _convert.key_from_proto(message)
        self.key_cache.put(tenant_id, key)
        return key

    def cached_key(self, tenant_id: str, key_id: str) -> Key | None:
        key = self.key_cache.get(tenant_id, key_id)
        if key is not None:
            self.metrics.add("cache_hits")
        return key
