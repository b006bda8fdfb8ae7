"""What the sync and asyncio clients share: requests and results, deadlines, retries, breaker, cache, counters.

The two clients differ only in how they wait for the network.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from tenacity import RetryCallState, retry_if_exception, stop_after_attempt, wait_random_exponential
from tenacity.stop import stop_base

from crypto_client import _convert
from crypto_client.breaker import CircuitBreaker
from crypto_client.config import ClientConfig, check_tenant_id
from crypto_client.errors import (
    CircuitOpenError,
    CryptoClientError,
    DeadlineExceededError,
    from_item_error,
    from_rpc_error,
)
from crypto_client.errors import is_transport_failure as _is_transport_failure
from crypto_client.key_cache import KeyMetadataCache
from crypto_client.metrics import ClientMetrics, ClientStats
from crypto_client.models import (
    Algorithm,
    DataKey,
    DecryptItem,
    DecryptResult,
    EncryptItem,
    EncryptResult,
    HealthStatus,
    Key,
    KeyState,
    KeyType,
    MacResult,
    PublicKey,
    ReEncryptResult,
    SessionKey,
    SignResult,
)
from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb

log = logging.getLogger("crypto_client")
REQUEST_ID_HEADER = "x-request-id"
_HEALTH_STATUS = {
    health_pb2.HealthCheckResponse.SERVING: HealthStatus.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: HealthStatus.NOT_SERVING,
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: HealthStatus.SERVICE_UNKNOWN,
}


class _PastDeadline(stop_base):
    """Stop retrying once the call's deadline has passed."""

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def __call__(self, retry_state: RetryCallState) -> bool:
        return time.monotonic() >= self._deadline


def _is_retryable(error: BaseException) -> bool:
    return isinstance(error, CryptoClientError) and error.transient


class ClientCore:
    def __init__(self, tenant_id: str, config: ClientConfig) -> None:
        self.tenant_id = check_tenant_id(tenant_id)
        self.config = config
        self.metrics = ClientMetrics()
        self.breaker = CircuitBreaker(
            config.breaker, on_transition=lambda _old, _new: self.metrics.add("breaker_transitions")
        )
        self.key_cache = KeyMetadataCache(config.key_cache_ttl_s, config.key_cache_size)

    # -- one call --------------------------------------------------------------

    def deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.config.timeout_s if timeout_s is None else timeout_s)

    @staticmethod
    def call_metadata() -> tuple[tuple[str, str], ...]:
        """One request id per call, the same on every attempt, for the server's log."""
        return ((REQUEST_ID_HEADER, uuid.uuid4().hex),)

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
        try:
            self.breaker.before_call()
        except CircuitOpenError:
            self.metrics.add("rejected_by_breaker")
            raise
        self.metrics.add("attempts")

    def failed(self, error: grpc.RpcError) -> CryptoClientError:
        typed = from_rpc_error(error)
        if _is_transport_failure(typed):
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        return typed

    def stats(self) -> ClientStats:
        return self.metrics.snapshot(self.breaker.state.value)

    # -- requests and results -------------------------------------------------------

    def create_key_request(
        self,
        key_type: KeyType,
        expire_after: timedelta | None,
        rotation_period: timedelta | None,
        labels: Mapping[str, str] | None,
        request_id: str | None,
        algorithm: Algorithm = Algorithm.AES_256_GCM,
    ) -> key_pb.CreateKeyRequest:
        request = key_pb.CreateKeyRequest(
            tenant_id=self.tenant_id,
            key_type=_convert.KEY_TYPE_TO_PROTO[key_type],
            algorithm=_convert.ALGORITHM_TO_PROTO[algorithm],
            labels=dict(labels or {}),
            # One id for every attempt of this call: a retry after a lost response creates nothing new.
            request_id=request_id or uuid.uuid4().hex,
        )
        if expire_after is not None:
            request.expire_after.CopyFrom(_convert.duration(expire_after))
        if rotation_period is not None:
            request.rotation_period.CopyFrom(_convert.duration(rotation_period))
        return request

    def get_key_request(self, key_id: str) -> key_pb.GetKeyRequest:
        return key_pb.GetKeyRequest(tenant_id=self.tenant_id, key_id=key_id)

    def list_keys_request(
        self, key_type: KeyType | None, state: KeyState | None, page_size: int, page_token: str
    ) -> key_pb.ListKeysRequest:
        request = key_pb.ListKeysRequest(tenant_id=self.tenant_id, page_size=page_size, page_token=page_token)
        if key_type is not None:
            request.key_type = _convert.KEY_TYPE_TO_PROTO[key_type]
        if state is not None:
            request.state = _convert.KEY_STATE_TO_PROTO[state]
        return request

    def rotate_key_request(self, key_id: str, request_id: str | None) -> key_pb.RotateKeyRequest:
        return key_pb.RotateKeyRequest(
            tenant_id=self.tenant_id, key_id=key_id, request_id=request_id or uuid.uuid4().hex
        )

    def disable_key_request(self, key_id: str) -> key_pb.DisableKeyRequest:
        return key_pb.DisableKeyRequest(tenant_id=self.tenant_id, key_id=key_id)

    def enable_key_request(self, key_id: str) -> key_pb.EnableKeyRequest:
        return key_pb.EnableKeyRequest(tenant_id=self.tenant_id, key_id=key_id)

    def encrypt_request(self, key_id: str, plaintext: bytes, aad: bytes) -> crypto_pb.EncryptRequest:
        return crypto_pb.EncryptRequest(tenant_id=self.tenant_id, key_id=key_id, plaintext=plaintext, aad=aad)

    def decrypt_request(self, ciphertext: bytes, aad: bytes, key_id: str | None) -> crypto_pb.DecryptRequest:
        return crypto_pb.DecryptRequest(tenant_id=self.tenant_id, ciphertext=ciphertext, aad=aad, key_id=key_id or "")

    def key_changed(self, response: Any) -> Key:
        """The key from a create/rotate/disable/enable response; the cache must not serve its old state."""
        key = _convert.key_from_proto(response.key)
        self.key_cache.forget(key.key_id)
        return key

    def key_fetched(self, response: key_pb.GetKeyResponse) -> Key:
        key = _convert.key_from_proto(response.key)
        self.key_cache.put(key)
        return key

    def cached_key(self, key_id: str) -> Key | None:
        key = self.key_cache.get(key_id)
        if key is not None:
            self.metrics.add("cache_hits")
        return key

    @staticmethod
    def keys_of(response: key_pb.ListKeysResponse) -> list[Key]:
        return [_convert.key_from_proto(key) for key in response.keys]

    @staticmethod
    def encrypted(response: crypto_pb.EncryptResponse) -> EncryptResult:
        return EncryptResult(ciphertext=response.ciphertext, key_id=response.key_id, key_version=response.key_version)

    @staticmethod
    def decrypted(response: crypto_pb.DecryptResponse) -> DecryptResult:
        return DecryptResult(plaintext=response.plaintext, key_id=response.key_id, key_version=response.key_version)

    @staticmethod
    def health_status(response: health_pb2.HealthCheckResponse) -> HealthStatus:
        return _HEALTH_STATUS.get(response.status, HealthStatus.UNKNOWN)

    # -- envelope, migration, batches, session keys ------------------------------------

    def generate_data_key_request(
        self, key_id: str, aad: bytes, without_plaintext: bool
    ) -> crypto_pb.GenerateDataKeyRequest:
        return crypto_pb.GenerateDataKeyRequest(
            tenant_id=self.tenant_id, key_id=key_id, aad=aad, without_plaintext=without_plaintext
        )

    @staticmethod
    def data_key(response: crypto_pb.GenerateDataKeyResponse, without_plaintext: bool) -> DataKey:
        return DataKey(
            plaintext=None if without_plaintext else response.plaintext,
            ciphertext=response.ciphertext,
            key_id=response.key_id,
            key_version=response.key_version,
        )

    def re_encrypt_request(
        self, ciphertext: bytes, aad: bytes, source_key_id: str | None, destination_key_id: str | None
    ) -> crypto_pb.ReEncryptRequest:
        return crypto_pb.ReEncryptRequest(
            tenant_id=self.tenant_id,
            ciphertext=ciphertext,
            aad=aad,
            source_key_id=source_key_id or "",
            destination_key_id=destination_key_id or "",
        )

    @staticmethod
    def re_encrypted(response: crypto_pb.ReEncryptResponse) -> ReEncryptResult:
        return ReEncryptResult(
            ciphertext=response.ciphertext,
            key_id=response.key_id,
            key_version=response.key_version,
            source_key_id=response.source_key_id,
            source_key_version=response.source_key_version,
        )

    def batch_encrypt_request(self, items: Sequence[EncryptItem]) -> crypto_pb.BatchEncryptRequest:
        return crypto_pb.BatchEncryptRequest(
            tenant_id=self.tenant_id,
            items=[
                crypto_pb.BatchEncryptRequest.Item(key_id=i.key_id, plaintext=i.plaintext, aad=i.aad) for i in items
            ],
        )

    def batch_decrypt_request(self, items: Sequence[DecryptItem]) -> crypto_pb.BatchDecryptRequest:
        return crypto_pb.BatchDecryptRequest(
            tenant_id=self.tenant_id,
            items=[
                crypto_pb.BatchDecryptRequest.Item(ciphertext=i.ciphertext, aad=i.aad, key_id=i.key_id or "")
                for i in items
            ],
        )

    @staticmethod
    def batch_encrypted(response: crypto_pb.BatchEncryptResponse) -> list[EncryptResult | CryptoClientError]:
        return [
            _item_error(r.error)
            if r.HasField("error")
            else EncryptResult(ciphertext=r.ciphertext, key_id=r.key_id, key_version=r.key_version)
            for r in response.results
        ]

    @staticmethod
    def batch_decrypted(response: crypto_pb.BatchDecryptResponse) -> list[DecryptResult | CryptoClientError]:
        return [
            _item_error(r.error)
            if r.HasField("error")
            else DecryptResult(plaintext=r.plaintext, key_id=r.key_id, key_version=r.key_version)
            for r in response.results
        ]

    def generate_session_key_request(
        self, expire_after: timedelta | None, labels: Mapping[str, str] | None, request_id: str | None
    ) -> key_pb.GenerateSessionKeyRequest:
        request = key_pb.GenerateSessionKeyRequest(
            tenant_id=self.tenant_id, labels=dict(labels or {}), request_id=request_id or uuid.uuid4().hex
        )
        if expire_after is not None:
            request.expire_after.CopyFrom(_convert.duration(expire_after))
        return request

    def get_session_key_request(self, key_id: str) -> key_pb.GetSessionKeyRequest:
        return key_pb.GetSessionKeyRequest(tenant_id=self.tenant_id, key_id=key_id)

    @staticmethod
    def session_key(response: key_pb.GenerateSessionKeyResponse | key_pb.GetSessionKeyResponse) -> SessionKey:
        key = _convert.key_from_proto(response.key)
        version = getattr(response, "key_version", 0) or key.primary_version
        return SessionKey(key=key, key_material=response.key_material, key_version=version)

    # -- MACs and signatures -----------------------------------------------------------------

    def compute_mac_request(self, key_id: str, data: bytes, key_version: int) -> crypto_pb.ComputeMacRequest:
        return crypto_pb.ComputeMacRequest(tenant_id=self.tenant_id, key_id=key_id, data=data, key_version=key_version)

    def verify_mac_request(self, key_id: str, data: bytes, mac: bytes, key_version: int) -> crypto_pb.VerifyMacRequest:
        return crypto_pb.VerifyMacRequest(
            tenant_id=self.tenant_id, key_id=key_id, data=data, mac=mac, key_version=key_version
        )

    def sign_request(self, key_id: str, message: bytes) -> crypto_pb.SignRequest:
        return crypto_pb.SignRequest(tenant_id=self.tenant_id, key_id=key_id, message=message)

    def verify_request(
        self, key_id: str, message: bytes, signature: bytes, key_version: int
    ) -> crypto_pb.VerifyRequest:
        return crypto_pb.VerifyRequest(
            tenant_id=self.tenant_id, key_id=key_id, message=message, signature=signature, key_version=key_version
        )

    def public_key_request(self, key_id: str, key_version: int) -> crypto_pb.GetPublicKeyRequest:
        return crypto_pb.GetPublicKeyRequest(tenant_id=self.tenant_id, key_id=key_id, key_version=key_version)

    @staticmethod
    def mac_result(response: crypto_pb.ComputeMacResponse) -> MacResult:
        return MacResult(mac=response.mac, key_id=response.key_id, key_version=response.key_version)

    @staticmethod
    def sign_result(response: crypto_pb.SignResponse) -> SignResult:
        return SignResult(
            signature=response.signature,
            key_id=response.key_id,
            key_version=response.key_version,
            algorithm=_convert.ALGORITHM_FROM_PROTO[response.algorithm],
        )

    @staticmethod
    def public_key(response: crypto_pb.GetPublicKeyResponse) -> PublicKey:
        return PublicKey(
            pem=response.pem,
            algorithm=_convert.ALGORITHM_FROM_PROTO[response.algorithm],
            key_id=response.key_id,
            key_version=response.key_version,
        )

    # -- streams -----------------------------------------------------------------------------

    def encrypt_stream_requests(
        self, key_id: str, aad: bytes, chunks: Iterable[bytes]
    ) -> Iterator[crypto_pb.EncryptStreamRequest]:
        yield crypto_pb.EncryptStreamRequest(tenant_id=self.tenant_id, key_id=key_id, aad=aad)
        for chunk in chunks:
            if chunk:
                yield crypto_pb.EncryptStreamRequest(chunk=chunk)

    def decrypt_stream_requests(
        self, aad: bytes, key_id: str | None, chunks: Iterable[bytes]
    ) -> Iterator[crypto_pb.DecryptStreamRequest]:
        yield crypto_pb.DecryptStreamRequest(tenant_id=self.tenant_id, aad=aad, key_id=key_id or "")
        for chunk in chunks:
            if chunk:
                yield crypto_pb.DecryptStreamRequest(chunk=chunk)


def _item_error(error: crypto_pb.ItemError) -> CryptoClientError:
    return from_item_error(error.code, error.message, error.reason, dict(error.metadata))
