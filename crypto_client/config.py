"""Client settings: one validated object for timeouts, retries, the circuit breaker and caching."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

_TENANT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, only for transient failures.

    The wait before retry n is random in [0, min(max_backoff_s, initial_backoff_s * 2**(n-1))].

    A call retries at most `max_attempts - 1` times and never past its
    deadline. When the server says how long to wait (RetryInfo, e.g. a tenant
    over its quota) the wait is at least that; a call the server asks to wait
    longer than `max_server_delay_s` (or past the deadline) fails at once
    instead. Every call is safe to repeat: CreateKey and RotateKey carry a
    request id the server deduplicates, the others do not change state or set
    it absolutely.
    """

    max_attempts: int = 4
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    # Each attempt's own deadline (None: the rest of the call's deadline). With
    # a value, an attempt that times out can be retried within the call's deadline.
    attempt_timeout_s: float | None = None
    max_server_delay_s: float = 2.0

    def __post_init__(self) -> None:
        if self.max_server_delay_s < 0:
            raise ValueError("RetryPolicy.max_server_delay_s must not be negative")
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if not 0 < self.initial_backoff_s <= self.max_backoff_s:
            raise ValueError("RetryPolicy needs 0 < initial_backoff_s <= max_backoff_s")
        if self.attempt_timeout_s is not None and self.attempt_timeout_s <= 0:
            raise ValueError("RetryPolicy.attempt_timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """Open after `failure_threshold` consecutive calls failed by transport (a call counts once, whatever its
    retries); probe again after `reset_timeout_s`, or as soon as the channel reconnects."""

    failure_threshold: int = 5
    reset_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.failure_threshold < 1:
            raise ValueError("BreakerPolicy.failure_threshold must be at least 1")
        if self.reset_timeout_s <= 0:
            raise ValueError("BreakerPolicy.reset_timeout_s must be positive")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Everything about a client but its target and tenant.

    `credentials`: TLS channel credentials (`tls_credentials(...)` builds them from files, with a client
    certificate for mTLS); None for plaintext.
    `token_provider`: returns the bearer token (a JWT) to send as `authorization: Bearer <token>`; called
    before every attempt, so a provider that refreshes its token is heard at once. None: no token.
    `timeout_s`: each call's deadline, retries included, unless the call passes its own.
    `key_cache_ttl_s`: how long get_key answers from memory (0 turns the cache off).
    `max_reconnect_backoff_s`: the longest the channel waits between attempts to reconnect to a server that
    is down (gRPC's own default grows to 120 s); the client is back within about this long of the server.
    `clock`: monotonic seconds for the key cache's lifetime and the breaker's reset timeout (tests pass a clock
    they move by hand). Call deadlines always use the real clock: gRPC enforces them in real time.
    """

    credentials: grpc.ChannelCredentials | None = None
    token_provider: Callable[[], str] | None = None
    timeout_s: float = 5.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    key_cache_ttl_s: float = 5.0
    key_cache_size: int = 1024
    channel_options: Sequence[tuple[str, Any]] = ()
    # Above the largest send limit a server can have (64 MiB plaintexts, plus aad and framing): grpc's
    # default of 4 MiB would refuse a large batch or Decrypt answer the server may legitimately send.
    max_receive_message_bytes: int = 72 * 1024 * 1024
    max_reconnect_backoff_s: float = 1.0
    clock: Callable[[], float] = time.monotonic

    def __post_init__(self) -> None:
        if self.timeout_s <= 0:
            raise ValueError("ClientConfig.timeout_s must be positive")
        if self.key_cache_ttl_s < 0 or self.key_cache_size < 1:
            raise ValueError("ClientConfig needs key_cache_ttl_s >= 0 and key_cache_size >= 1")
        if not 0.1 <= self.max_reconnect_backoff_s <= 120:
            raise ValueError("ClientConfig.max_reconnect_backoff_s must be between 0.1 and 120 seconds")


def tls_credentials(
    ca_file: str | Path | None = None, cert_file: str | Path | None = None, key_file: str | Path | None = None
) -> grpc.ChannelCredentials:
    """TLS channel credentials from PEM files: the CA that signed the server's certificate (None: the system's
    roots), and for mTLS the client's certificate chain and private key (both or neither)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("tls_credentials needs cert_file and key_file together (mTLS), or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=Path(ca_file).read_bytes() if ca_file is not None else None,
        private_key=Path(key_file).read_bytes() if key_file is not None else None,
        certificate_chain=Path(cert_file).read_bytes() if cert_file is not None else None,
    )


def check_tenant_id(tenant_id: str) -> str:
    """Fail before sending, with a ValueError, for a tenant id the service would refuse."""
    if not isinstance(tenant_id, str) or _TENANT_ID.fullmatch(tenant_id) is None:
        raise ValueError("tenant_id must be 1-64 characters of letters, digits, '_', '.' or '-'")
    return tenant_id
