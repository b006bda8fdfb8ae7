"""CryptoClient: the blocking client, over a grpc.Channel."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import Retrying

from crypto_client._core import ClientCore
from crypto_client.config import ClientConfig
from crypto_client.errors import CryptoClientError, from_rpc_error
from crypto_client.metrics import ClientStats
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
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc

_Response = TypeVar("_Response")


class CryptoClient:
    """The crypto service for one tenant.

        with CryptoClient("crypto-service:3009", "acme") as crypto:
            key = crypto.create_key()
            sealed = crypto.encrypt(key.key_id, b"hello", aad=b"conversation-42")
            crypto.decrypt(sealed.ciphertext, aad=b"conversation-42").plaintext

    Every method takes `timeout` (seconds, retries included; default
    `config.timeout_s`) and raises a `crypto_client.errors.CryptoClientError`
    subclass on failure. Thread-safe: share one client per process and tenant.
    """

    def __init__(self, target: str, tenant_id: str, config: ClientConfig | None = None) -> None:
        self._core = ClientCore(tenant_id, config or ClientConfig())
        config = self._core.config
        # The caller's options come last, so they win over ours.
        options = [("grpc.max_receive_message_length", config.max_receive_message_bytes), *config.channel_options]
        credentials = self._core.config.credentials
        self._channel = (
            grpc.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.insecure_channel(target, options=options)
        )
        self._keys = key_service_pb2_grpc.KeyServiceStub(self._channel)
        self._crypto = crypto_service_pb2_grpc.CryptoServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def tenant_id(self) -> str:
        return self._core.tenant_id

    def _call(self, method: str, rpc: Callable[..., _Response], request: Any, timeout: float | None) -> _Response:
        core = self._core
        deadline = core.deadline(timeout)
        metadata = core.call_metadata()
        core.metrics.add("calls")
        try:
            for attempt in Retrying(**core.retrying(method, deadline)):
                with attempt:
                    attempt_timeout = core.attempt_timeout(deadline)
                    core.admit()
                    try:
                        response = rpc(request, timeout=attempt_timeout, metadata=metadata)
                    except grpc.RpcError as error:
                        raise core.failed(error) from None
                    except BaseException:
                        core.breaker.release()
                        raise
                    core.breaker.record_success()
                    return response
        except BaseException:
            core.metrics.add("failures")
            raise
        raise AssertionError("tenacity neither returned nor raised")

    # -- keys ------------------------------------------------------------------

    def create_key(
        self,
        key_type: KeyType = KeyType.DATA,
        *,
        expire_after: timedelta | None = None,
        rotation_period: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        algorithm: Algorithm = Algorithm.AES_256_GCM,
        timeout: float | None = None,
    ) -> Key:
        """Create a key. Retries are safe: the request id (generated unless given) makes a repeat create nothing."""
        request = self._core.create_key_request(key_type, expire_after, rotation_period, labels, request_id, algorithm)
        return self._core.key_changed(self._call("CreateKey", self._keys.CreateKey, request, timeout))

    def get_key(self, key_id: str, *, use_cache: bool = True, timeout: float | None = None) -> Key:
        """A key's metadata; served from a short-lived cache unless `use_cache` is False."""
        cached = self._core.cached_key(key_id) if use_cache else None
        if cached is not None:
            return cached
        response = self._call("GetKey", self._keys.GetKey, self._core.get_key_request(key_id), timeout)
        return self._core.key_fetched(response)

    def list_keys(
        self,
        *,
        key_type: KeyType | None = None,
        state: KeyState | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> Iterator[Key]:
        """Every key of the tenant (oldest first), fetching pages as the iteration goes."""
        token = ""
        while True:
            request = self._core.list_keys_request(key_type, state, page_size, token)
            page = self._call("ListKeys", self._keys.ListKeys, request, timeout)
            yield from self._core.keys_of(page)
            token = page.next_page_token
            if not token:
                return

    def rotate_key(self, key_id: str, *, request_id: str | None = None, timeout: float | None = None) -> Key:
        """Add a version and make it primary. Retries are safe: a repeat of the request id adds nothing."""
        request = self._core.rotate_key_request(key_id, request_id)
        return self._core.key_changed(self._call("RotateKey", self._keys.RotateKey, request, timeout))

    def disable_key(self, key_id: str, *, timeout: float | None = None) -> Key:
        request = self._core.disable_key_request(key_id)
        return self._core.key_changed(self._call("DisableKey", self._keys.DisableKey, request, timeout))

    def enable_key(self, key_id: str, *, timeout: float | None = None) -> Key:
        request = self._core.enable_key_request(key_id)
        return self._core.key_changed(self._call("EnableKey", self._keys.EnableKey, request, timeout))

    # -- data --------------------------------------------------------------------

    def encrypt(
        self, key_id: str, plaintext: bytes, *, aad: bytes = b"", timeout: float | None = None
    ) -> EncryptResult:
        request = self._core.encrypt_request(key_id, plaintext, aad)
        return self._core.encrypted(self._call("Encrypt", self._crypto.Encrypt, request, timeout))

    def decrypt(
        self, ciphertext: bytes, *, aad: bytes = b"", key_id: str | None = None, timeout: float | None = None
    ) -> DecryptResult:
        request = self._core.decrypt_request(ciphertext, aad, key_id)
        return self._core.decrypted(self._call("Decrypt", self._crypto.Decrypt, request, timeout))

    # -- envelope encryption, migration, batches -----------------------------------------

    def generate_data_key(
        self, key_id: str, *, aad: bytes = b"", without_plaintext: bool = False, timeout: float | None = None
    ) -> DataKey:
        """A fresh 256-bit data key and its copy wrapped under `key_id` (decrypt() unwraps it)."""
        request = self._core.generate_data_key_request(key_id, aad, without_plaintext)
        response = self._call("GenerateDataKey", self._crypto.GenerateDataKey, request, timeout)
        return self._core.data_key(response, without_plaintext)

    def re_encrypt(
        self,
        ciphertext: bytes,
        *,
        aad: bytes = b"",
        source_key_id: str | None = None,
        destination_key_id: str | None = None,
        timeout: float | None = None,
    ) -> ReEncryptResult:
        """The plaintext under the primary version (or another key), without it leaving the service."""
        request = self._core.re_encrypt_request(ciphertext, aad, source_key_id, destination_key_id)
        return self._core.re_encrypted(self._call("ReEncrypt", self._crypto.ReEncrypt, request, timeout))

    def batch_encrypt(
        self, items: Sequence[EncryptItem], *, timeout: float | None = None
    ) -> list[EncryptResult | CryptoClientError]:
        """One result per item, in order: the ciphertext, or the typed error of that item alone."""
        request = self._core.batch_encrypt_request(items)
        return self._core.batch_encrypted(self._call("BatchEncrypt", self._crypto.BatchEncrypt, request, timeout))

    def batch_decrypt(
        self, items: Sequence[DecryptItem], *, timeout: float | None = None
    ) -> list[DecryptResult | CryptoClientError]:
        request = self._core.batch_decrypt_request(items)
        return self._core.batch_decrypted(self._call("BatchDecrypt", self._crypto.BatchDecrypt, request, timeout))

    # -- session keys ---------------------------------------------------------------------

    def generate_session_key(
        self,
        *,
        expire_after: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> SessionKey:
        """A new short-lived key and its material (a repeated `request_id` returns the same key)."""
        request = self._core.generate_session_key_request(expire_after, labels, request_id)
        response = self._call("GenerateSessionKey", self._keys.GenerateSessionKey, request, timeout)
        return self._core.session_key(response)

    def get_session_key(self, key_id: str, *, timeout: float | None = None) -> SessionKey:
        """A session key's material while it is enabled and unexpired."""
        request = self._core.get_session_key_request(key_id)
        return self._core.session_key(self._call("GetSessionKey", self._keys.GetSessionKey, request, timeout))

    # -- MACs and signatures ---------------------------------------------------------------

    def compute_mac(self, key_id: str, data: bytes, *, key_version: int = 0, timeout: float | None = None) -> MacResult:
        """HMAC-SHA256 under an HMAC key (its primary version unless `key_version` is given)."""
        request = self._core.compute_mac_request(key_id, data, key_version)
        return self._core.mac_result(self._call("ComputeMac", self._crypto.ComputeMac, request, timeout))

    def verify_mac(
        self, key_id: str, data: bytes, mac: bytes, *, key_version: int, timeout: float | None = None
    ) -> bool:
        request = self._core.verify_mac_request(key_id, data, mac, key_version)
        return bool(self._call("VerifyMac", self._crypto.VerifyMac, request, timeout).valid)

    def sign(self, key_id: str, message: bytes, *, timeout: float | None = None) -> SignResult:
        """Sign with an Ed25519 or ECDSA P-256 key; the private key never leaves the service."""
        request = self._core.sign_request(key_id, message)
        return self._core.sign_result(self._call("Sign", self._crypto.Sign, request, timeout))

    def verify(
        self, key_id: str, message: bytes, signature: bytes, *, key_version: int, timeout: float | None = None
    ) -> bool:
        request = self._core.verify_request(key_id, message, signature, key_version)
        return bool(self._call("Verify", self._crypto.Verify, request, timeout).valid)

    def get_public_key(self, key_id: str, *, key_version: int = 0, timeout: float | None = None) -> PublicKey:
        request = self._core.public_key_request(key_id, key_version)
        return self._core.public_key(self._call("GetPublicKey", self._crypto.GetPublicKey, request, timeout))

    # -- streams ---------------------------------------------------------------------

    def _stream(
        self, rpc: Callable[..., Iterator[Any]], requests: Iterator[Any], timeout: float | None
    ) -> Iterator[Any]:
        """A streaming call: admitted by the breaker, never retried (its input cannot be replayed)."""
        core = self._core
        core.metrics.add("calls")
        core.admit()
        try:
            yield from rpc(requests, timeout=timeout, metadata=core.call_metadata())
        except grpc.RpcError as error:
            core.metrics.add("failures")
            raise core.failed(error) from None
        except BaseException:
            core.breaker.release()
            raise
        core.breaker.record_success()

    def encrypt_stream(
        self, key_id: str, chunks: Iterable[bytes], *, aad: bytes = b"", timeout: float | None = None
    ) -> Iterator[bytes]:
        """Encrypt a stream of any length (segmented AEAD); yields ciphertext as it comes. No deadline
        unless `timeout` is given: a large file takes as long as it takes."""
        requests = self._core.encrypt_stream_requests(key_id, aad, chunks)
        for response in self._stream(self._crypto.EncryptStream, requests, timeout):
            yield response.chunk

    def decrypt_stream(
        self,
        chunks: Iterable[bytes],
        *,
        aad: bytes = b"",
        key_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[bytes]:
        """Decrypt what encrypt_stream produced; yields plaintext as it comes. Treat it as untrusted until
        the iteration ends without error: truncation is detected only at the end."""
        requests = self._core.decrypt_stream_requests(aad, key_id, chunks)
        for response in self._stream(self._crypto.DecryptStream, requests, timeout):
            yield response.chunk

    # -- operations ----------------------------------------------------------------

    def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """One health check, outside retries and the circuit breaker (it is how you look past them)."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = self._health.Check(request, timeout=self._core.attempt_timeout(self._core.deadline(timeout)))
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return self._core.health_status(response)

    def stats(self) -> ClientStats:
        return self._core.stats()

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> CryptoClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()
