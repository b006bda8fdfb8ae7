"""The one table from domain errors to gRPC status codes and ErrorInfo reasons."""

from __future__ import annotations

import collections
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from crypto_client.v1 import errors_pb2
from crypto_server.domain import errors

ERROR_DOMAIN = "crypto.caas"
# Sent back in the trailers of every call: the id the server logged the call under.
REQUEST_ID_HEADER = "x-request-id"

# The one table: each domain error's status code and ErrorInfo reason, grouped by the code a caller gets. A
# subclass not listed gets its nearest listed base's (describe() walks the MRO).
_BY_CODE: dict[grpc.StatusCode, dict[type[errors.CryptoServiceError], errors_pb2.ErrorReason.ValueType]] = {
    grpc.StatusCode.INVALID_ARGUMENT: {
        errors.InvalidArgument: errors_pb2.ERROR_REASON_INVALID_FIELD,
        errors.DecryptionFailed: errors_pb2.ERROR_REASON_DECRYPTION_FAILED,
        errors.BackupMalformed: errors_pb2.ERROR_REASON_BACKUP_MALFORMED,
        errors.BackupTampered: errors_pb2.ERROR_REASON_BACKUP_TAMPERED,
        errors.BackupKeyUnsupported: errors_pb2.ERROR_REASON_BACKUP_KEY_UNSUPPORTED,
    },
    grpc.StatusCode.NOT_FOUND: {errors.KeyNotFound: errors_pb2.ERROR_REASON_KEY_NOT_FOUND},
    grpc.StatusCode.ALREADY_EXISTS: {
        errors.MasterKeyExists: errors_pb2.ERROR_REASON_MASTER_KEY_EXISTS,
        errors.KeyAlreadyExists: errors_pb2.ERROR_REASON_KEY_EXISTS,
    },
    grpc.StatusCode.FAILED_PRECONDITION: {
        errors.KeyDisabled: errors_pb2.ERROR_REASON_KEY_DISABLED,
        errors.KeyExpired: errors_pb2.ERROR_REASON_KEY_EXPIRED,
        errors.KeyVersionExhausted: errors_pb2.ERROR_REASON_KEY_VERSION_EXHAUSTED,
        errors.KeyTypeMismatch: errors_pb2.ERROR_REASON_KEY_TYPE_MISMATCH,
        errors.MasterKeyUnavailable: errors_pb2.ERROR_REASON_MASTER_KEY_UNAVAILABLE,
        errors.AlgorithmMismatch: errors_pb2.ERROR_REASON_ALGORITHM_MISMATCH,
        errors.KeyVersionDestroyed: errors_pb2.ERROR_REASON_KEY_VERSION_DESTROYED,
        errors.KeyVersionDisabled: errors_pb2.ERROR_REASON_KEY_VERSION_DISABLED,
        errors.KeyVersionStateConflict: errors_pb2.ERROR_REASON_KEY_VERSION_STATE,
        errors.TenantDestroyed: errors_pb2.ERROR_REASON_TENANT_DESTROYED,
        errors.TenantDestructionScheduled: errors_pb2.ERROR_REASON_TENANT_DESTRUCTION_SCHEDULED,
        errors.BackupKeyMismatch: errors_pb2.ERROR_REASON_BACKUP_KEY_MISMATCH,
    },
    grpc.StatusCode.ABORTED: {errors.ConcurrentModification: errors_pb2.ERROR_REASON_CONCURRENT_MODIFICATION},
    grpc.StatusCode.RESOURCE_EXHAUSTED: {
        errors.StreamLimitReached: errors_pb2.ERROR_REASON_STREAM_LIMIT,
        errors.QuotaExceeded: errors_pb2.ERROR_REASON_TENANT_QUOTA,
        errors.ResponseTooLarge: errors_pb2.ERROR_REASON_RESPONSE_TOO_LARGE,
    },
    grpc.StatusCode.DEADLINE_EXCEEDED: {errors.StreamIdle: errors_pb2.ERROR_REASON_STREAM_IDLE},
    grpc.StatusCode.UNAUTHENTICATED: {errors.Unauthenticated: errors_pb2.ERROR_REASON_UNAUTHENTICATED},
    grpc.StatusCode.PERMISSION_DENIED: {errors.PermissionDenied: errors_pb2.ERROR_REASON_PERMISSION_DENIED},
    grpc.StatusCode.UNAVAILABLE: {
        errors.StoreUnavailable: errors_pb2.ERROR_REASON_STORE_UNAVAILABLE,
        errors.RootKeyUnavailable: errors_pb2.ERROR_REASON_ROOT_KEY_UNAVAILABLE,
        errors.ServerShuttingDown: errors_pb2.ERROR_REASON_SHUTTING_DOWN,
        errors.AuditUnavailable: errors_pb2.ERROR_REASON_AUDIT_UNAVAILABLE,
    },
    grpc.StatusCode.DATA_LOSS: {errors.KeyIntegrityError: errors_pb2.ERROR_REASON_KEY_INTEGRITY},
    grpc.StatusCode.INTERNAL: {errors.UnexpectedError: errors_pb2.ERROR_REASON_INTERNAL},
}
_TABLE = {kind: (code, reason) for code, kinds in _BY_CODE.items() for kind, reason in kinds.items()}


@dataclass(frozen=True, slots=True)
class ErrorDescription:
    """What a caller is told about one error: as a call's status, or as one batch item's error."""

    code: grpc.StatusCode
    reason: errors_pb2.ErrorReason.ValueType
    message: str
    metadata: dict[str, str]
    # How long the caller should wait before trying again (a google.rpc.RetryInfo detail), if the server knows.
    retry_delay_s: float | None = None


def describe(error: errors.CryptoServiceError) -> ErrorDescription:
    code, reason = next(_TABLE[kind] for kind in type(error).__mro__ if kind in _TABLE)
    metadata: dict[str, str] = {}
    if isinstance(error, errors.InvalidArgument):
        metadata["field"] = error.field
    key_id = getattr(error, "key_id", None)
    if isinstance(key_id, str):
        metadata["key_id"] = key_id
    if isinstance(error, errors.StreamIdle):
        metadata["idle_timeout_s"] = f"{error.idle_timeout_s:g}"
    elif isinstance(error, errors.StreamLimitReached):
        metadata["limit"] = str(error.limit)
    elif isinstance(error, errors.PermissionDenied):
        metadata["permission"] = error.permission
    return ErrorDescription(code, reason, error.message, metadata, error.retry_after_s)


class _RpcStatus(collections.namedtuple("_RpcStatus", ("code", "details", "trailing_metadata")), grpc.Status):
    """A grpc.Status whose trailers carry the rich status and the request id."""


def _status(
    code: grpc.StatusCode,
    message: str,
    reason: errors_pb2.ErrorReason.ValueType,
    metadata: dict[str, str],
    request_id: str,
    retry_delay_s: float | None = None,
) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(
        reason=errors_pb2.ErrorReason.Name(reason),
        domain=ERROR_DOMAIN,
        metadata=metadata,
    )
    details = [any_pb2.Any()]
    details[0].Pack(info)
    if retry_delay_s is not None:
        retry = error_details_pb2.RetryInfo()
        retry.retry_delay.FromNanoseconds(max(1, round(retry_delay_s * 1e9)))
        details.append(any_pb2.Any())
        details[1].Pack(retry)
    rich = rpc_status.to_status(status_pb2.Status(code=getattr(code_pb2, code.name), message=message, details=details))
    return _RpcStatus(rich.code, rich.details, (*rich.trailing_metadata, (REQUEST_ID_HEADER, request_id)))


def status_for(error: errors.CryptoServiceError, request_id: str) -> tuple[grpc.StatusCode, grpc.Status]:
    """The status a caller receives for `error`."""
    described = describe(error)
    status = _status(
        described.code, described.message, described.reason, described.metadata, request_id, described.retry_delay_s
    )
    return described.code, status


def internal_status(request_id: str) -> grpc.Status:
    """The last resort for a bug: says nothing about the cause, points at the log line."""
    message = f"internal error; the server log has details under request id {request_id}"
    return _status(
        grpc.StatusCode.INTERNAL, message, errors_pb2.ERROR_REASON_INTERNAL, {"request_id": request_id}, request_id
    )
