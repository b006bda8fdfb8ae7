"""AsyncCryptoClient: the asyncio client, over a grpc.aio.Channel. Same methods as CryptoClient."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import AsyncRetrying

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


class AsyncCryptoClient:
    """The crypto service for one tenant, for asyncio services.

        async with AsyncCryptoClient("crypto-service:3009", "acme") as crypto:
            key = await crypto.create_key()
            sealed = await crypto.encrypt(key.key_id, b"hello", aad=b"conversation-42")
            (await crypto.decrypt(sealed.ciphertext, aad=b"conversation-42")).plaintext

    Same methods, errors, retries and breaker as CryptoClient. Create it inside
    the event loop that uses it.
    """

    def __init__(self, target: str, tenant_id: str, config: ClientConfig | None = None) -> None:
        self._core = ClientCore(tenant_id, config or ClientConfig())
        config = self._core.config
        # The caller's options come last, so they win over ours.
        options = [("grpc.max_receive_message_length", config.max_receive_message_bytes), *config.channel_options]
        credentials = self._core.config.credentials
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._keys = key_service_pb2_grpc.KeyServiceStub(self._channel)
        self._crypto = crypto_service_pb2_grpc.CryptoServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    @property
    def tenant_id(self) -> str:
        return self._core.tenant_id

    async def _call(
        self, method: str, rpc: Callable[..., Awaitable[_Response]], request: Any, timeout: float | None
    ) -> _Response:
        core = self._core
        deadline = core.deadline(timeout)
        metadata = core.call_metadata()
        core.metrics.add("calls")
        try:
            async for attempt in AsyncRetrying(**core.retrying(method, deadline)):
                with attempt:
                    attempt_timeout = core.attempt_timeout(deadline)
                    core.admit()
                    try:
                        response = await rpc(request, timeout=attempt_timeout, metadata=metadata)
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

    async def create_key(
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
        return self._core.key_changed(await self._call("CreateKey", self._keys.CreateKey, request, timeout))

    async def get_key(self, key_id: str, *, use_cache: bool = True, timeout: float | None = None) -> Key:
        """A key's metadata; served from a short-lived cache unless `use_cache` is False."""
        cached = self._core.cached_key(key_id) if use_cache else None
        if cached is not None:
            return cached
        response = await self._call("GetKey", self._keys.GetKey, self._core.get_key_request(key_id), timeout)
        return self._core.key_fetched(response)

    async def list_keys(
        self,
        *,
        key_type: KeyType | None = None,
        state: KeyState | None = None,
        page_size: int = 100,
        timeout: float | None = None,
    ) -> AsyncIterator[Key]:
        """Every key of the tenant (oldest first), fetching pages as the iteration goes."""
        token = ""
        while True:
            request = self._core.list_keys_request(key_type, state, page_size, token)
            page = await self._call("ListKeys", self._keys.ListKeys, request, timeout)
            for key in self._core.keys_of(page):
                yield key
            token = page.next_page_token
            if not token:
                return

    async def rotate_key(self, key_id: str, *, request_id: str | None = None, timeout: float | None = None) -> Key:
        """Add a version and make it primary. Retries are safe: a repeat of the request id adds nothing."""
        request = self._core.rotate_key_request(key_id, request_id)
        return self._core.key_changed(await self._call("RotateKey", self._keys.RotateKey, request, timeout))

    async def disable_key(self, key_id: str, *, timeout: float | None = None) -> Key:
        request = self._core.disable_key_request(key_id)
        return self._core.key_changed(await self._call("DisableKey", self._keys.DisableKey, request, timeout))

    async def enable_key(self, key_id: str, *, timeout: float | None = None) -> Key:
        request = self._core.enable_key_request(key_id)
        return self._core.key_changed(await self._call("EnableKey", self._keys.EnableKey, request, timeout))

    # -- data --------------------------------------------------------------------

    async def encrypt(
        self, key_id: str, plaintext: bytes, *, aad: bytes = b"", timeout: float | None = None
    ) -> EncryptResult:
        request = self._core.encrypt_request(key_id, plaintext, aad)
        return self._core.encrypted(await self._call("Encrypt", self._crypto.Encrypt, request, timeout))

    async def decrypt(
        self, ciphertext: bytes, *, aad: bytes = b"", key_id: str | None = None, timeout: float | None = None
    ) -> DecryptResult:
        request = self._core.decrypt_request(ciphertext, aad, key_id)
        return self._core.decrypted(await self._call("Decrypt", self._crypto.Decrypt, request, timeout))

    # -- envelope encryption, migration, batches -----------------------------------------

    async def generate_data_key(
        self, key_id: str, *, aad: bytes = b"", without_plaintext: bool = False, timeout: float | None = None
    ) -> DataKey:
        """A fresh 256-bit data key and its copy wrapped under `key_id` (decrypt() unwraps it)."""
        request = self._core.generate_data_key_request(key_id, aad, without_plaintext)
        response = await self._call("GenerateDataKey", self._crypto.GenerateDataKey, request, timeout)
        return self._core.data_key(response, without_plaintext)

    async def re_encrypt(
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
        return self._core.re_encrypted(await self._call("ReEncrypt", self._crypto.ReEncrypt, request, timeout))

    async def batch_encrypt(
        self, items: Sequence[EncryptItem], *, timeout: float | None = None
    ) -> list[EncryptResult | CryptoClientError]:
        """One result per item, in order: the ciphertext, or the typed error of that item alone."""
        request = self._core.batch_encrypt_request(items)
        return self._core.batch_encrypted(await self._call("BatchEncrypt", self._crypto.BatchEncrypt, request, timeout))

    async def batch_decrypt(
        self, items: Sequence[DecryptItem], *, timeout: float | None = None
    ) -> list[DecryptResult | CryptoClientError]:
        request = self._core.batch_decrypt_request(items)
        return self._core.batch_decrypted(await self._call("BatchDecrypt", self._crypto.BatchDecrypt, request, timeout))

    # -- session keys ---------------------------------------------------------------------

    async def generate_session_key(
        self,
        *,
        expire_after: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> SessionKey:
        """A new short-lived key and its material (a repeated `request_id` returns the same key)."""
        request = self._core.generate_session_key_request(expire_after, labels, request_id)
        response = await self._call("GenerateSessionKey", self._keys.GenerateSessionKey, request, timeout)
        return self._core.session_key(response)

    async def get_session_key(self, key_id: str, *, timeout: float | None = None) -> SessionKey:
        """A session key's material while it is enabled and unexpired."""
        request = self._core.get_session_key_request(key_id)
        return self._core.session_key(await self._call("GetSessionKey", self._keys.GetSessionKey, request, timeout))

    # -- MACs and signatures ---------------------------------------------------------------

    async def compute_mac(
        self, key_id: str, data: bytes, *, key_version: int = 0, timeout: float | None = None
    ) -> MacResult:
        """HMAC-SHA256 under an HMAC key (its primary version unless `key_version` is given)."""
        request = self._core.compute_mac_request(key_id, data, key_version)
        return self._core.mac_result(await self._call("ComputeMac", self._crypto.ComputeMac, request, timeout))

    async def verify_mac(
        self, key_id: str, data: bytes, mac: bytes, *, key_version: int, timeout: float | None = None
    ) -> bool:
        request = self._core.verify_mac_request(key_id, data, mac, key_version)
        return bool((await self._call("VerifyMac", self._crypto.VerifyMac, request, timeout)).valid)

    async def sign(self, key_id: str, message: bytes, *, timeout: float | None = None) -> SignResult:
        """Sign with an Ed25519 or ECDSA P-256 key; the private key never leaves the service."""
        request = self._core.sign_request(key_id, message)
        return self._core.sign_result(await self._call("Sign", self._crypto.Sign, request, timeout))

    async def verify(
        self, key_id: str, message: bytes, signature: bytes, *, key_version: int, timeout: float | None = None
    ) -> bool:
        request = self._core.verify_request(key_id, message, signature, key_version)
        return bool((await self._call("Verify", self._crypto.Verify, request, timeout)).valid)

    async def get_public_key(self, key_id: str, *, key_version: int = 0, timeout: float | None = None) -> PublicKey:
        request = self._core.public_key_request(key_id, key_version)
        return self._core.public_key(await self._call("GetPublicKey", self._crypto.GetPublicKey, request, timeout))

    # -- operations ----------------------------------------------------------------

    async def health(self, service: str = "", *, timeout: float | None = None) -> HealthStatus:
        """One health check, outside retries and the circuit breaker (it is how you look past them)."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._health.Check(
                request, timeout=self._core.attempt_timeout(self._core.deadline(timeout))
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return self._core.health_status(response)

    def stats(self) -> ClientStats:
        return self._core.stats()

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncCryptoClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()
