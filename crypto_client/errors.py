"""Typed errors, mapped from the gRPC status code and the ErrorInfo reason the service attaches.

Every error keeps `code` (grpc.StatusCode), `details` (the server's message),
`reason` (the ErrorInfo reason, or "") and `metadata` (ErrorInfo metadata).
`transient` says whether the same call may succeed if repeated.
"""

from __future__ import annotations

from collections.abc import Mapping

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
    ) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.reason = reason
        self.metadata: Mapping[str, str] = dict(metadata or {})

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


class KeyTypeMismatchError(FailedPreconditionError):
    pass


class MasterKeyUnavailableError(FailedPreconditionError):
    pass


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
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceededError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhaustedError,
    grpc.StatusCode.DATA_LOSS: DataIntegrityError,
}


def _error_info(error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key != _STATUS_DETAILS_KEY or not isinstance(value, bytes):
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
                return info
    return None


def from_rpc_error(error: grpc.RpcError) -> CryptoClientError:
    """The typed error for a failed call (sync or asyncio)."""
    code: grpc.StatusCode = error.code()
    details: str = error.details() or code.name
    info = _error_info(error)
    kind = (_BY_REASON.get(info.reason) if info else None) or _BY_CODE.get(code, InternalServerError)
    return kind(details, code=code, reason=info.reason if info else "", metadata=dict(info.metadata) if info else {})


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
