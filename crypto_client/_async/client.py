"""AsyncCryptoClient: the asyncio client, over a grpc.aio.Channel.

This file is the one declaration of every RPC method: `make unasync` generates the blocking CryptoClient
(crypto_client/_sync/client.py) from it, and a test fails when that copy is stale. A new RPC is one method
here: build the request, `await self._call(...)` (deadline, retries, breaker, counters), map the response.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import timedelta
from types import EllipsisType, TracebackType
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tenacity import AsyncRetrying

from crypto_client import _convert, models
from crypto_client._connectivity import AsyncChannelWatch
from crypto_client._core import ClientCore
from crypto_client._stream_messages import (
    decrypt_chunk_request,
    encrypt_chunk_request,
    serialize_stream_request,
    stream_response_deserializer,
)
from crypto_client.config import ClientConfig
from crypto_client.errors import CryptoClientError, from_item_error, from_rpc_error
from crypto_client.metrics import ClientStats
from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc
from crypto_client.v1 import key_service_pb2 as key_pb

_STREAM_METHOD = "/" + crypto_pb.DESCRIPTOR.services_by_name["CryptoService"].full_name + "/{}"

_Response = TypeVar("_Response")
_HEALTH_STATUS = {
    health_pb2.HealthCheckResponse.SERVING: models.HealthStatus.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING: models.HealthStatus.NOT_SERVING,
    health_pb2.HealthCheckResponse.SERVICE_UNKNOWN: models.HealthStatus.SERVICE_UNKNOWN,
}


class AsyncCryptoClient:
    """The crypto service for asyncio services: one client per process and target, for any number of tenants.

        async with AsyncCryptoClient("crypto-service:3009", "acme") as crypto:
            key = await crypto.create_key()
            sealed = await crypto.encrypt(key.key_id, b"hello", aad=b"conversation-42")
            (await crypto.decrypt(sealed.ciphertext, aad=b"conversation-42")).plaintext

    `tenant_id` (constructor) is the default tenant; every tenant-scoped method also takes `tenant_id=`, so
    a gateway serving thousands of tenants needs one client (one channel, one breaker) and may give no
    default at all. Every method takes `timeout` (seconds, retries included; default `config.timeout_s`)
    and raises a `crypto_client.errors.CryptoClientError` subclass on failure; a missing or malformed
    tenant id raises ValueError before anything is sent. Create it inside the event loop that uses it.
    """

    def __init__(self, target: str, tenant_id: str | None = None, config: ClientConfig | None = None) -> None:
        self._core = ClientCore(tenant_id, config or ClientConfig())
        options = self._core.channel_options()
        credentials = self._core.config.credentials
        self._channel = (
            grpc.aio.secure_channel(target, credentials, options=options)
            if credentials is not None
            else grpc.aio.insecure_channel(target, options=options)
        )
        self._watch = AsyncChannelWatch(self._channel, self._core.breaker)
        self._keys = key_service_pb2_grpc.KeyServiceStub(self._channel)
        self._crypto = crypto_service_pb2_grpc.CryptoServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)
        # The streams send their chunk messages already encoded (crypto_client/_stream_messages.py).
        self._encrypt_stream = self._channel.stream_stream(
            _STREAM_METHOD.format("EncryptStream"),
            request_serializer=serialize_stream_request,
            response_deserializer=stream_response_deserializer(crypto_pb.EncryptStreamResponse),
        )
        self._decrypt_stream = self._channel.stream_stream(
            _STREAM_METHOD.format("DecryptStream"),
            request_serializer=serialize_stream_request,
            response_deserializer=stream_response_deserializer(crypto_pb.DecryptStreamResponse),
        )

    @property
    def tenant_id(self) -> str | None:
        """The default tenant (None: every call names its own)."""
        return self._core.default_tenant

    async def _call(
        self, method: str, rpc: Callable[..., Awaitable[_Response]], request: Any, timeout: float | None
    ) -> _Response:
        """One unary call: admitted once by the breaker, attempts retried within the deadline, one outcome.

        The first attempt is made here, outside tenacity, whose state, closures and bookkeeping cost more per call
        than the rest of the client: tenacity is set up only when that attempt fails, and is handed the failure as
        its own first attempt, so whether, when and how often to retry is decided exactly as if it had made it.
        """
        core = self._core
        deadline = core.deadline(timeout)
        metadata = core.call_metadata()
        self._watch.poll()
        core.admit()
        sent = False
        outcome: BaseException | None = None

        async def attempt() -> _Response:
            nonlocal sent
            attempt_timeout = core.attempt_timeout(deadline)
            core.metrics.add("attempts")
            sent = True
            try:
                return await rpc(request, timeout=attempt_timeout, metadata=core.attempt_metadata(metadata))
            except grpc.RpcError as error:
                raise from_rpc_error(error) from None

        try:
            try:
                return await attempt()
            except Exception as error:
                first_failure: Exception | None = error
            async for retry in AsyncRetrying(**core.retrying(method, deadline)):
                with retry:
                    if first_failure is not None:
                        failure, first_failure = first_failure, None
                        raise failure
                    return await attempt()
        except BaseException as error:
            outcome = error
            raise
        finally:
            core.ended(outcome, sent=sent)
        raise AssertionError("tenacity neither returned nor raised")

    # -- keys ------------------------------------------------------------------

    async def create_key(
        self,
        key_type: models.KeyType = models.KeyType.DATA,
        *,
        expire_after: timedelta | None = None,
        rotation_period: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        algorithm: models.Algorithm = models.Algorithm.AES_256_GCM,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.Key:
        """Create a key. Retries are safe: the request id (generated unless given) makes a repeat create nothing."""
        tenant = self._core.tenant(tenant_id)
        request = key_pb.CreateKeyRequest(
            tenant_id=tenant,
            key_type=_convert.KEY_TYPE_TO_PROTO[key_type],
            algorithm=_convert.ALGORITHM_TO_PROTO[algorithm],
            labels=dict(labels or {}),
            request_id=request_id or _convert.new_request_id(),
        )
        if expire_after is not None:
            request.expire_after.CopyFrom(_convert.duration(expire_after))
        if rotation_period is not None:
            request.rotation_period.CopyFrom(_convert.duration(rotation_period))
        response = await self._call("CreateKey", self._keys.CreateKey, request, timeout)
        return self._core.key_changed(tenant, response.key)

    async def get_key(
        self, key_id: str, *, use_cache: bool = True, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        """A key's metadata; served from a short-lived cache unless `use_cache` is False."""
        tenant = self._core.tenant(tenant_id)
        cached = self._core.cached_key(tenant, key_id) if use_cache else None
        if cached is not None:
            return cached
        request = key_pb.GetKeyRequest(tenant_id=tenant, key_id=key_id)
        response = await self._call("GetKey", self._keys.GetKey, request, timeout)
        return self._core.key_fetched(tenant, response.key)

    async def list_keys(
        self,
        *,
        key_type: models.KeyType | None = None,
        state: models.KeyState | None = None,
        page_size: int = 100,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[models.Key]:
        """Every key of the tenant (oldest first), fetching pages as the iteration goes."""
        request = key_pb.ListKeysRequest(tenant_id=self._core.tenant(tenant_id), page_size=page_size)
        if key_type is not None:
            request.key_type = _convert.KEY_TYPE_TO_PROTO[key_type]
        if state is not None:
            request.state = _convert.KEY_STATE_TO_PROTO[state]
        while True:
            page = await self._call("ListKeys", self._keys.ListKeys, request, timeout)
            for key in page.keys:
                yield _convert.key_from_proto(key)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def list_key_versions(
        self,
        key_id: str,
        *,
        page_size: int = 100,
        page_token: str = "",
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.KeyVersionPage:
        """One page of the key's versions (oldest first); pass its `next_page_token` for the next page. A key's
        `versions` (get_key) may hold only some of them; `version_count` says how many there are."""
        request = key_pb.ListKeyVersionsRequest(
            tenant_id=self._core.tenant(tenant_id), key_id=key_id, page_size=page_size, page_token=page_token
        )
        page = await self._call("ListKeyVersions", self._keys.ListKeyVersions, request, timeout)
        return models.KeyVersionPage(
            versions=tuple(_convert.key_version_from_proto(v) for v in page.versions),
            next_page_token=page.next_page_token,
        )

    async def iter_key_versions(
        self, key_id: str, *, page_size: int = 100, tenant_id: str | None = None, timeout: float | None = None
    ) -> AsyncIterator[models.KeyVersion]:
        """Every version of the key (oldest first), fetching pages as the iteration goes."""
        token = ""
        while True:
            page = await self.list_key_versions(
                key_id, page_size=page_size, page_token=token, tenant_id=tenant_id, timeout=timeout
            )
            for version in page.versions:
                yield version
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def read_audit_log(
        self, *, page_size: int = 100, tenant_id: str | None = None, timeout: float | None = None
    ) -> AsyncIterator[models.AuditRecord]:
        """The tenant's audit records (oldest first), fetching pages as the iteration goes; needs audit_read."""
        request = key_pb.ReadAuditLogRequest(tenant_id=self._core.tenant(tenant_id), page_size=page_size)
        while True:
            page = await self._call("ReadAuditLog", self._keys.ReadAuditLog, request, timeout)
            for record in page.records:
                yield _convert.audit_record_from_proto(record)
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def rotate_key(
        self, key_id: str, *, request_id: str | None = None, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        """Add a version and make it primary. Retries are safe: a repeat of the request id adds nothing."""
        tenant = self._core.tenant(tenant_id)
        request = key_pb.RotateKeyRequest(
            tenant_id=tenant, key_id=key_id, request_id=request_id or _convert.new_request_id()
        )
        response = await self._call("RotateKey", self._keys.RotateKey, request, timeout)
        return self._core.key_changed(tenant, response.key)

    async def update_key(
        self,
        key_id: str,
        *,
        rotation_period: timedelta | EllipsisType | None = ...,
        expire_after: timedelta | EllipsisType | None = ...,
        labels: Mapping[str, str] | EllipsisType | None = ...,
        min_decryption_version: int | EllipsisType = ...,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.Key:
        """Change the settings given (left out: unchanged; None: cleared — no automatic rotation, versions
        that never expire, no labels). `expire_after` applies to versions created from now on;
        `min_decryption_version` (0: none) makes older versions refuse to decrypt. Safe to retry: it sets values."""
        tenant = self._core.tenant(tenant_id)
        request = key_pb.UpdateKeyRequest(tenant_id=tenant, key_id=key_id)
        if not isinstance(rotation_period, EllipsisType):
            request.update_mask.paths.append("rotation_period")
            if rotation_period is not None:
                request.rotation_period.CopyFrom(_convert.duration(rotation_period))
        if not isinstance(expire_after, EllipsisType):
            request.update_mask.paths.append("expire_after")
            if expire_after is not None:
                request.expire_after.CopyFrom(_convert.duration(expire_after))
        if not isinstance(labels, EllipsisType):
            request.update_mask.paths.append("labels")
            request.labels.update(labels or {})
        if not isinstance(min_decryption_version, EllipsisType):
            request.update_mask.paths.append("min_decryption_version")
            request.min_decryption_version = min_decryption_version
        response = await self._call("UpdateKey", self._keys.UpdateKey, request, timeout)
        return self._core.key_changed(tenant, response.key)

    async def disable_key(
        self, key_id: str, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        tenant = self._core.tenant(tenant_id)
        request = key_pb.DisableKeyRequest(tenant_id=tenant, key_id=key_id)
        response = await self._call("DisableKey", self._keys.DisableKey, request, timeout)
        return self._core.key_changed(tenant, response.key)

    async def enable_key(
        self, key_id: str, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        tenant = self._core.tenant(tenant_id)
        request = key_pb.EnableKeyRequest(tenant_id=tenant, key_id=key_id)
        response = await self._call("EnableKey", self._keys.EnableKey, request, timeout)
        return self._core.key_changed(tenant, response.key)

    # -- versions and destruction ------------------------------------------------------

    async def disable_key_version(
        self, key_id: str, version: int, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        """Stop one version (not the primary) from encrypting and decrypting until enabled again."""
        tenant = self._core.tenant(tenant_id)
        request = key_pb.DisableKeyVersionRequest(tenant_id=tenant, key_id=key_id, version=version)
        response = await self._call("DisableKeyVersion", self._keys.DisableKeyVersion, request, timeout)
        return self._core.key_changed(tenant, response.key)

    async def enable_key_version(
        self, key_id: str, version: int, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        tenant = self._core.tenant(tenant_id)
        request = key_pb.EnableKeyVersionRequest(tenant_id=tenant, key_id=key_id, version=version)
        response = await self._call("EnableKeyVersion", self._keys.EnableKeyVersion, request, timeout)
        return self._core.key_changed(tenant, response.key)

    async def schedule_key_destruction(
        self,
        key_id: str,
        *,
        version: int = 0,
        waiting_period: timedelta | None = None,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.Key:
        """Schedule the destruction of one version (not the primary), or with `version` 0 of the whole key, after
        `waiting_period` (1-30 days; None: 7). Until then it refuses every use and can be cancelled. Safe to
        retry: a version already scheduled keeps its time."""
        tenant = self._core.tenant(tenant_id)
        response: key_pb.ScheduleKeyVersionDestructionResponse | key_pb.ScheduleKeyDestructionResponse
        if version:
            one = key_pb.ScheduleKeyVersionDestructionRequest(tenant_id=tenant, key_id=key_id, version=version)
            if waiting_period is not None:
                one.waiting_period.CopyFrom(_convert.duration(waiting_period))
            response = await self._call(
                "ScheduleKeyVersionDestruction", self._keys.ScheduleKeyVersionDestruction, one, timeout
            )
        else:
            whole = key_pb.ScheduleKeyDestructionRequest(tenant_id=tenant, key_id=key_id)
            if waiting_period is not None:
                whole.waiting_period.CopyFrom(_convert.duration(waiting_period))
            response = await self._call("ScheduleKeyDestruction", self._keys.ScheduleKeyDestruction, whole, timeout)
        return self._core.key_changed(tenant, response.key)

    async def cancel_key_destruction(
        self, key_id: str, *, version: int = 0, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        """Cancel the scheduled destruction of `version` (0: every scheduled version) before it runs."""
        tenant = self._core.tenant(tenant_id)
        request = key_pb.CancelKeyDestructionRequest(tenant_id=tenant, key_id=key_id, version=version)
        response = await self._call("CancelKeyDestruction", self._keys.CancelKeyDestruction, request, timeout)
        return self._core.key_changed(tenant, response.key)

    async def schedule_tenant_destruction(
        self, *, waiting_period: timedelta | None = None, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        """Crypto-shred the tenant after `waiting_period` (1-30 days; None: 7): its master key and every key under
        it are destroyed, and nothing it encrypted can be decrypted again. Needs the admin permission. Returns
        the master key, every version scheduled."""
        tenant = self._core.tenant(tenant_id)
        request = key_pb.ScheduleTenantDestructionRequest(tenant_id=tenant)
        if waiting_period is not None:
            request.waiting_period.CopyFrom(_convert.duration(waiting_period))
        response = await self._call("ScheduleTenantDestruction", self._keys.ScheduleTenantDestruction, request, timeout)
        return self._core.key_changed(tenant, response.master_key)

    async def cancel_tenant_destruction(
        self, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        tenant = self._core.tenant(tenant_id)
        request = key_pb.CancelTenantDestructionRequest(tenant_id=tenant)
        response = await self._call("CancelTenantDestruction", self._keys.CancelTenantDestruction, request, timeout)
        return self._core.key_changed(tenant, response.master_key)

    async def export_key(
        self,
        key_id: str,
        *,
        backup_public_key: str | bytes | None = None,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> tuple[models.Key, bytes]:
        """The key and a backup of it with all its versions (docs/backup.md): encrypted for `backup_public_key`
        (PEM, RSA 3072 or X25519) when given, else under the server's root key. Needs `admin`."""
        pem = backup_public_key.decode() if isinstance(backup_public_key, bytes) else backup_public_key
        request = key_pb.ExportKeyRequest(
            tenant_id=self._core.tenant(tenant_id), key_id=key_id, backup_public_key=pem or ""
        )
        response = await self._call("ExportKey", self._keys.ExportKey, request, timeout)
        return _convert.key_from_proto(response.key), response.backup

    async def import_key(
        self, backup: bytes, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.Key:
        """Restore a key from an export_key backup into the tenant it came from; never over an existing key
        (KeyAlreadyExistsError, also when a retry finds its own first attempt done). Needs `admin`."""
        tenant = self._core.tenant(tenant_id)
        request = key_pb.ImportKeyRequest(tenant_id=tenant, backup=backup)
        response = await self._call("ImportKey", self._keys.ImportKey, request, timeout)
        return self._core.key_changed(tenant, response.key)

    # -- data --------------------------------------------------------------------

    async def encrypt(
        self,
        key_id: str,
        plaintext: bytes,
        *,
        aad: bytes = b"",
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.EncryptResult:
        request = crypto_pb.EncryptRequest(
            tenant_id=self._core.tenant(tenant_id), key_id=key_id, plaintext=plaintext, aad=aad
        )
        response = await self._call("Encrypt", self._crypto.Encrypt, request, timeout)
        return models.EncryptResult(
            ciphertext=response.ciphertext, key_id=response.key_id, key_version=response.key_version
        )

    async def decrypt(
        self,
        ciphertext: bytes,
        *,
        aad: bytes = b"",
        key_id: str | None = None,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.DecryptResult:
        request = crypto_pb.DecryptRequest(
            tenant_id=self._core.tenant(tenant_id), ciphertext=ciphertext, aad=aad, key_id=key_id or ""
        )
        response = await self._call("Decrypt", self._crypto.Decrypt, request, timeout)
        return models.DecryptResult(
            plaintext=response.plaintext, key_id=response.key_id, key_version=response.key_version
        )

    # -- envelope encryption, migration, batches -----------------------------------------

    async def generate_data_key(
        self,
        key_id: str,
        *,
        aad: bytes = b"",
        without_plaintext: bool = False,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.DataKey:
        """A fresh 256-bit data key and its copy wrapped under `key_id` (decrypt() unwraps it)."""
        request = crypto_pb.GenerateDataKeyRequest(
            tenant_id=self._core.tenant(tenant_id), key_id=key_id, aad=aad, without_plaintext=without_plaintext
        )
        response = await self._call("GenerateDataKey", self._crypto.GenerateDataKey, request, timeout)
        return models.DataKey(
            plaintext=None if without_plaintext else response.plaintext,
            ciphertext=response.ciphertext,
            key_id=response.key_id,
            key_version=response.key_version,
        )

    async def re_encrypt(
        self,
        ciphertext: bytes,
        *,
        aad: bytes = b"",
        source_key_id: str | None = None,
        destination_key_id: str | None = None,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.ReEncryptResult:
        """The plaintext under the primary version (or another key), without it leaving the service."""
        request = crypto_pb.ReEncryptRequest(
            tenant_id=self._core.tenant(tenant_id),
            ciphertext=ciphertext,
            aad=aad,
            source_key_id=source_key_id or "",
            destination_key_id=destination_key_id or "",
        )
        response = await self._call("ReEncrypt", self._crypto.ReEncrypt, request, timeout)
        return models.ReEncryptResult(
            ciphertext=response.ciphertext,
            key_id=response.key_id,
            key_version=response.key_version,
            source_key_id=response.source_key_id,
            source_key_version=response.source_key_version,
        )

    async def batch_encrypt(
        self, items: Sequence[models.EncryptItem], *, tenant_id: str | None = None, timeout: float | None = None
    ) -> list[models.EncryptResult | CryptoClientError]:
        """One result per item, in order: the ciphertext, or the typed error of that item alone."""
        request = crypto_pb.BatchEncryptRequest(
            tenant_id=self._core.tenant(tenant_id),
            items=[
                crypto_pb.BatchEncryptRequest.Item(key_id=i.key_id, plaintext=i.plaintext, aad=i.aad) for i in items
            ],
        )
        response = await self._call("BatchEncrypt", self._crypto.BatchEncrypt, request, timeout)
        return [
            _item_error(r.error)
            if r.HasField("error")
            else models.EncryptResult(ciphertext=r.ciphertext, key_id=r.key_id, key_version=r.key_version)
            for r in response.results
        ]

    async def batch_decrypt(
        self, items: Sequence[models.DecryptItem], *, tenant_id: str | None = None, timeout: float | None = None
    ) -> list[models.DecryptResult | CryptoClientError]:
        request = crypto_pb.BatchDecryptRequest(
            tenant_id=self._core.tenant(tenant_id),
            items=[
                crypto_pb.BatchDecryptRequest.Item(ciphertext=i.ciphertext, aad=i.aad, key_id=i.key_id or "")
                for i in items
            ],
        )
        response = await self._call("BatchDecrypt", self._crypto.BatchDecrypt, request, timeout)
        return [
            _item_error(r.error)
            if r.HasField("error")
            else models.DecryptResult(plaintext=r.plaintext, key_id=r.key_id, key_version=r.key_version)
            for r in response.results
        ]

    # -- session keys ---------------------------------------------------------------------

    async def generate_session_key(
        self,
        *,
        expire_after: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str | None = None,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.SessionKey:
        """A new short-lived key and its material (a repeated `request_id` returns the same key)."""
        request = key_pb.GenerateSessionKeyRequest(
            tenant_id=self._core.tenant(tenant_id),
            labels=dict(labels or {}),
            request_id=request_id or _convert.new_request_id(),
        )
        if expire_after is not None:
            request.expire_after.CopyFrom(_convert.duration(expire_after))
        response = await self._call("GenerateSessionKey", self._keys.GenerateSessionKey, request, timeout)
        return _convert.session_key(response.key, response.key_material, version=0)

    async def get_session_key(
        self, key_id: str, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.SessionKey:
        """A session key's material while it is enabled and unexpired."""
        request = key_pb.GetSessionKeyRequest(tenant_id=self._core.tenant(tenant_id), key_id=key_id)
        response = await self._call("GetSessionKey", self._keys.GetSessionKey, request, timeout)
        return _convert.session_key(response.key, response.key_material, version=response.key_version)

    # -- MACs and signatures ---------------------------------------------------------------

    async def compute_mac(
        self,
        key_id: str,
        data: bytes,
        *,
        key_version: int = 0,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> models.MacResult:
        """HMAC-SHA256 under an HMAC key (its primary version unless `key_version` is given)."""
        request = crypto_pb.ComputeMacRequest(
            tenant_id=self._core.tenant(tenant_id), key_id=key_id, data=data, key_version=key_version
        )
        response = await self._call("ComputeMac", self._crypto.ComputeMac, request, timeout)
        return models.MacResult(mac=response.mac, key_id=response.key_id, key_version=response.key_version)

    async def verify_mac(
        self,
        key_id: str,
        data: bytes,
        mac: bytes,
        *,
        key_version: int,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        request = crypto_pb.VerifyMacRequest(
            tenant_id=self._core.tenant(tenant_id), key_id=key_id, data=data, mac=mac, key_version=key_version
        )
        return bool((await self._call("VerifyMac", self._crypto.VerifyMac, request, timeout)).valid)

    async def sign(
        self, key_id: str, message: bytes, *, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.SignResult:
        """Sign with an Ed25519 or ECDSA P-256 key; the private key never leaves the service."""
        request = crypto_pb.SignRequest(tenant_id=self._core.tenant(tenant_id), key_id=key_id, message=message)
        response = await self._call("Sign", self._crypto.Sign, request, timeout)
        return models.SignResult(
            signature=response.signature,
            key_id=response.key_id,
            key_version=response.key_version,
            algorithm=_convert.ALGORITHM_FROM_PROTO[response.algorithm],
        )

    async def verify(
        self,
        key_id: str,
        message: bytes,
        signature: bytes,
        *,
        key_version: int,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> bool:
        request = crypto_pb.VerifyRequest(
            tenant_id=self._core.tenant(tenant_id),
            key_id=key_id,
            message=message,
            signature=signature,
            key_version=key_version,
        )
        return bool((await self._call("Verify", self._crypto.Verify, request, timeout)).valid)

    async def get_public_key(
        self, key_id: str, *, key_version: int = 0, tenant_id: str | None = None, timeout: float | None = None
    ) -> models.PublicKey:
        request = crypto_pb.GetPublicKeyRequest(
            tenant_id=self._core.tenant(tenant_id), key_id=key_id, key_version=key_version
        )
        response = await self._call("GetPublicKey", self._crypto.GetPublicKey, request, timeout)
        return models.PublicKey(
            pem=response.pem,
            algorithm=_convert.ALGORITHM_FROM_PROTO[response.algorithm],
            key_id=response.key_id,
            key_version=response.key_version,
        )

    # -- streams ---------------------------------------------------------------------

    async def _stream(
        self, rpc: Callable[..., Any], requests: AsyncIterator[Any], timeout: float | None
    ) -> AsyncIterator[Any]:
        """A streaming call: admitted by the breaker, never retried (its input cannot be replayed)."""
        core = self._core
        self._watch.poll()
        core.admit()
        core.metrics.add("attempts")
        call = rpc(requests, timeout=timeout, metadata=core.attempt_metadata(core.call_metadata()))
        outcome: BaseException | None = None
        try:
            async for response in call:
                yield response
        except grpc.RpcError as error:
            outcome = from_rpc_error(error)
            raise outcome from None
        except BaseException as error:
            outcome = error
            raise
        finally:
            call.cancel()  # when the caller stopped iterating early; nothing once the call has ended
            core.ended(outcome, sent=True)

    async def encrypt_stream(
        self,
        key_id: str,
        chunks: AsyncIterable[bytes],
        *,
        aad: bytes = b"",
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """Encrypt a stream of any length (segmented AEAD); yields ciphertext as it comes. No deadline
        unless `timeout` is given: a large file takes as long as it takes."""
        first = crypto_pb.EncryptStreamRequest(tenant_id=self._core.tenant(tenant_id), key_id=key_id, aad=aad)

        async def requests() -> AsyncIterator[crypto_pb.EncryptStreamRequest | bytes]:
            yield first
            async for chunk in chunks:
                if chunk:
                    yield encrypt_chunk_request(chunk)

        async for response in self._stream(self._encrypt_stream, requests(), timeout):
            yield response.chunk

    async def decrypt_stream(
        self,
        chunks: AsyncIterable[bytes],
        *,
        aad: bytes = b"",
        key_id: str | None = None,
        tenant_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[bytes]:
        """Decrypt what encrypt_stream produced; yields plaintext as it comes. Treat it as untrusted until
        the iteration ends without error: truncation is detected only at the end."""
        first = crypto_pb.DecryptStreamRequest(tenant_id=self._core.tenant(tenant_id), aad=aad, key_id=key_id or "")

        async def requests() -> AsyncIterator[crypto_pb.DecryptStreamRequest | bytes]:
            yield first
            async for chunk in chunks:
                if chunk:
                    yield decrypt_chunk_request(chunk)

        async for response in self._stream(self._decrypt_stream, requests(), timeout):
            yield response.chunk

    # -- operations ----------------------------------------------------------------

    async def health(self, service: str = "", *, timeout: float | None = None) -> models.HealthStatus:
        """One health check, outside retries and the circuit breaker (it is how you look past them)."""
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            response = await self._health.Check(
                request, timeout=self._core.attempt_timeout(self._core.deadline(timeout))
            )
        except grpc.RpcError as error:
            raise from_rpc_error(error) from None
        return _HEALTH_STATUS.get(response.status, models.HealthStatus.UNKNOWN)

    def stats(self) -> ClientStats:
        return self._core.stats()

    async def close(self) -> None:
        self._watch.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncCryptoClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()


def _item_error(error: crypto_pb.ItemError) -> CryptoClientError:
    return from_item_error(error.code, error.message, error.reason, dict(error.metadata))
