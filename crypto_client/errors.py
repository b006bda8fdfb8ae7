"""Typed errors, mapped from the gRPC status code and the ErrorInfo reason the service attaches.

Every error keeps `code` (grpc.StatusCode), `details` (the server's message),
`reason` (the ErrorInfo reason, or "") and `metadata` (ErrorInfo metadata).
`transient` says whether the same call may succeed if repeated;
`retry_after_s` is how long the server asked the caller to wait first
(a google.rpc.RetryInfo detail), or None.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

ERROR_DOMAIN = "crypto.caas"
_STATUS_DETAILS_KEY = "grpc-status-details-bin"


class CryptoClientError(Exception):
    transient = False

    def __init__(
        self,
        details: str,
        *,
        code: grpc.StatusCode | None = None,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata: Mapping[str, str] = dict(metadata or {})
        self.retry_after_s = retry_after_s

    def __str__(self) -> str:
        code = self.code.name if self.code is not None else "CLIENT"
        return f"{code}: {self.details}" + (f" ({self.reason})" if self.reason else "")


class InvalidArgumentError(CryptoClientError):
    """A request field is missing or malformed; `field` names it."""

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class DecryptionError(CryptoClientError):
    """The ciphertext could not be decrypted (tampered, wrong aad, wrong tenant or key). One fixed message."""


class KeyNotFoundError(CryptoClientError):
    pass


class KeyAlreadyExistsError(CryptoClientError):
    pass


class FailedPreconditionError(CryptoClientError):
    """The key's state forbids the operation."""


class KeyDisabledError(FailedPreconditionError):
    pass


class KeyExpiredError(FailedPreconditionError):
    """The key's primary version has expired: rotate it to encrypt again (decryption still works)."""


class KeyVersionExhaustedError(FailedPreconditionError):
    """The key's primary version has used up its encryption budget: rotate it to encrypt again (decryption
    still works)."""


class KeyTypeMismatchError(FailedPreconditionError):
    pass


class KeyVersionDestroyedError(FailedPreconditionError):
    """The key version (of the ciphertext, or named) is destroyed: what it encrypted is gone for good."""


class KeyVersionDisabledError(FailedPreconditionError):
    """The key version is disabled, below min_decryption_version, or scheduled for destruction: undoable."""


class KeyVersionStateError(FailedPreconditionError):
    """The version's state does not allow this change (e.g. disabling or destroying the primary)."""


class TenantDestroyedError(FailedPreconditionError):
    """The tenant was crypto-shredded: none of its keys can be used or created again."""


class TenantDestructionScheduledError(FailedPreconditionError):
    """The tenant is scheduled for destruction: its keys refuse every use until it is cancelled."""


class MasterKeyUnavailableError(FailedPreconditionError):
    pass


class AlgorithmMismatchError(FailedPreconditionError):
    """The key's algorithm does not do this operation (e.g. Encrypt with an HMAC key)."""


class BackupKeyMismatchError(FailedPreconditionError):
    """The backup is encrypted for a backup key (or root key) the server does not hold; the message names both."""


class PermissionDeniedError(CryptoClientError):
    pass


class UnauthenticatedError(CryptoClientError):
    pass


class ConflictError(CryptoClientError):
    """A concurrent change won; repeating the call is safe."""

    transient = True


class ServiceUnavailableError(CryptoClientError):
    """The service (or its key store) could not be reached; repeating the call is safe."""

    transient = True


class DeadlineExceededError(CryptoClientError):
    transient = True


class ResourceExhaustedError(CryptoClientError):
    transient = True


class QuotaExceededError(ResourceExhaustedError):
    """The tenant is over its request quota on that server; retried after `retry_after_s` (when short enough)."""


class StreamLimitError(ResourceExhaustedError):
    """The server serves as many streams as it allows. Not retried: open the stream again later."""

    transient = False


class ResponseTooLargeError(ResourceExhaustedError):
    """The answer would exceed the message limit: ask for less per call (a smaller batch)."""

    transient = False


class StreamIdleError(DeadlineExceededError):
    """The stream sent nothing for the server's idle timeout and was ended."""

    transient = False


class CircuitOpenError(ServiceUnavailableError):
    """The client's circuit breaker is open: the call failed fast without touching the network."""

    transient = False


class DataIntegrityError(CryptoClientError):
    """The service found a stored key damaged. Not the caller's fault; operators must look."""


class InternalServerError(CryptoClientError):
    pass


_BY_REASON: dict[str, type[CryptoClientError]] = {
    "ERROR_REASON_INVALID_FIELD": InvalidArgumentError,
    "ERROR_REASON_DECRYPTION_FAILED": DecryptionError,
    "ERROR_REASON_KEY_NOT_FOUND": KeyNotFoundError,
    "ERROR_REASON_MASTER_KEY_EXISTS": KeyAlreadyExistsError,
    "ERROR_REASON_KEY_DISABLED": KeyDisabledError,
    "ERROR_REASON_KEY_EXPIRED": KeyExpiredError,
    "ERROR_REASON_KEY_TYPE_MISMATCH": KeyTypeMismatchError,
    "ERROR_REASON_MASTER_KEY_UNAVAILABLE": MasterKeyUnavailableError,
    "ERROR_REASON_CONCURRENT_MODIFICATION": ConflictError,
    "ERROR_REASON_STORE_UNAVAILABLE": ServiceUnavailableError,
    "ERROR_REASON_KEY_INTEGRITY": DataIntegrityError,
    "ERROR_REASON_INTERNAL": InternalServerError,
    "ERROR_REASON_ALGORITHM_MISMATCH": AlgorithmMismatchError,
    "ERROR_REASON_STREAM_LIMIT": StreamLimitError,
    "ERROR_REASON_STREAM_IDLE": StreamIdleError,
    "ERROR_REASON_TENANT_QUOTA": QuotaExceededError,
    "ERROR_REASON_RESPONSE_TOO_LARGE": ResponseTooLargeError,
    "ERROR_REASON_SHUTTING_DOWN": ServiceUnavailableError,
    "ERROR_REASON_ROOT_KEY_UNAVAILABLE": ServiceUnavailableError,
    "ERROR_REASON_UNAUTHENTICATED": UnauthenticatedError,
    "ERROR_REASON_PERMISSION_DENIED": PermissionDeniedError,
    "ERROR_REASON_AUDIT_UNAVAILABLE": ServiceUnavailableError,
    "ERROR_REASON_KEY_VERSION_EXHAUSTED": KeyVersionExhaustedError,
    "ERROR_REASON_KEY_VERSION_DESTROYED": KeyVersionDestroyedError,
    "ERROR_REASON_KEY_VERSION_DISABLED": KeyVersionDisabledError,
    "ERROR_REASON_KEY_VERSION_STATE": KeyVersionStateError,
    "ERROR_REASON_TENANT_DESTROYED": TenantDestroyedError,
    "ERROR_REASON_TENANT_DESTRUCTION_SCHEDULED": TenantDestructionScheduledError,
    "ERROR_REASON_BACKUP_MALFORMED": InvalidArgumentError,
    "ERROR_REASON_BACKUP_TAMPERED": InvalidArgumentError,
    "ERROR_REASON_BACKUP_KEY_MISMATCH": BackupKeyMismatchError,
    "ERROR_REASON_KEY_EXISTS": KeyAlreadyExistsError,
    "ERROR_REASON_BACKUP_KEY_UNSUPPORTED": InvalidArgumentError,
}
_BY_CODE: dict[grpc.StatusCode, type[CryptoClientError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.NOT_FOUND: KeyNotFoundError,
    grpc.StatusCode.ALREADY_EXISTS: KeyAlreadyExistsError,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPreconditionError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
    grpc.StatusCode.ABORTED: ConflictError,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailableError,
    # This client never cancels its own calls (a deadline is DEADLINE_EXCEEDED, a cancelled asyncio task
    # raises CancelledError): a CANCELLED status comes from the server or the connection — a server that
    # stopped while the call was on its way — so the call may be repeated, on another replica.
    grpc.StatusCode.CANCELLED: ServiceUnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DATA_LOSS: DataIntegrityError,
}


def _rich_details(error: grpc.RpcError) -> tuple[error_details_pb2.ErrorInfo | None, float | None]:
    """The service's ErrorInfo and the RetryInfo delay (seconds), each if present."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    info = retry_after_s = None
    # grpc's stubs type metadata entries as _Metadatum; at run time they are (key, value) pairs.
    for key, value in cast("Iterable[tuple[str, str | bytes]]", trailing or ()):
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            found = error_details_pb2.ErrorInfo()
            retry = error_details_pb2.RetryInfo()
            if detail.Unpack(found) and found.domain == ERROR_DOMAIN:
                info = found
            elif detail.Unpack(retry):
                retry_after_s = retry.retry_delay.ToNanoseconds() / 1e9
    return info, retry_after_s


def from_rpc_error(error: grpc.RpcError) -> CryptoClientError:
    """The typed error for a failed call (sync or asyncio)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    info, retry_after_s = _rich_details(error)
    kind = (_BY_REASON.get(info.reason) if info else None) or _BY_CODE.get(code, InternalServerError)
    return kind(
        details,
        code=code,
        reason=info.reason if info else "",
        metadata=dict(info.metadata) if info else {},
        retry_after_s=retry_after_s,
    )


def from_item_error(code: int, message: str, reason: str, metadata: Mapping[str, str]) -> CryptoClientError:
    """The typed error for one failed item of a batch."""
    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    kind = _BY_REASON.get(reason) or _BY_CODE.get(status, InternalServerError)
    return kind(message, code=status, reason=reason, metadata=metadata)


def is_transport_failure(error: CryptoClientError) -> bool:
    """Whether the error says the service could not be reached or did not answer in time.

    Errors the service itself produced (they carry its ErrorInfo) prove it is
    reachable — even UNAVAILABLE because its key store is down, when
    encryption with cached keys still works — so they never count toward
    opening the circuit.
    """
    return (
        error.code
        in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
        and not error.reason
    )
