"""Which calls the audit trail records, and how: the one table, read by the middleware.

- Key changes (and admin calls): a record *before* the handler runs ("intent", written at once: if it cannot
  be written the handler does not run and the caller gets UNAVAILABLE, so no change is ever made
  unrecorded), and a record of the outcome after it (written at once too; if that one fails, the change
  stands — its intent record is in the chain — and the failure is logged).
- Crypto operations: an outcome record per CRYPTO_AUDIT_CRYPTO (all, denied_only = every call that did not
  succeed, sampled:N = those plus one success in N, none), queued.
- Any call refused for want of identity or permission (PERMISSION_DENIED, UNAUTHENTICATED), whatever raised
  it: an outcome record, queued.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any

import grpc

from crypto_server.call_context import current_principal
from crypto_server.domain.errors import AuditUnavailable
from crypto_server.service.audit import AuditEvent, AuditTrail

KEY_CHANGES = frozenset(
    {
        "CreateKey",
        "RotateKey",
        "UpdateKey",
        "DisableKey",
        "EnableKey",
        "GenerateSessionKey",
        "DisableKeyVersion",
        "EnableKeyVersion",
        "ScheduleKeyVersionDestruction",
        "ScheduleKeyDestruction",
        "CancelKeyDestruction",
    }
)
# Calls that use `admin` or read the audit trail: recorded like key changes.
ADMIN_CALLS = frozenset(
    {"ReadAuditLog", "ScheduleTenantDestruction", "CancelTenantDestruction", "ExportKey", "ImportKey"}
)
CRYPTO_OPERATIONS = frozenset(
    {
        "Encrypt",
        "Decrypt",
        "GenerateDataKey",
        "ReEncrypt",
        "BatchEncrypt",
        "BatchDecrypt",
        "ComputeMac",
        "VerifyMac",
        "Sign",
        "Verify",
        "EncryptStream",
        "DecryptStream",
        "GetSessionKey",
    }
)
_DENIALS = frozenset({grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED})
_RECORDED_BEFORE = KEY_CHANGES | ADMIN_CALLS


def _short(method: str) -> str:
    return method.rsplit("/", 1)[-1]


def _text(message: object, name: str) -> str:
    value = getattr(message, name, "")
    return value[:128] if isinstance(value, str) else ""


def _key_id(request: Any, response: Any) -> str:
    return _text(request, "key_id") or _text(getattr(response, "key", None), "key_id") or _text(response, "key_id")


def _key_version(response: Any) -> int:
    for name in ("key_version", "version"):
        value = getattr(response, name, 0)
        if isinstance(value, int) and value:
            return value
    key = getattr(response, "key", None)
    value = getattr(key, "primary_version", 0)
    return value if isinstance(value, int) else 0


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()[:128]
    except Exception:
        return ""


class CallAudit:
    """Records calls into an AuditTrail as the table above says."""

    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail
        self._crypto = trail.crypto
        self._sampled = itertools.count()

    def _event(
        self, method: str, request: Any, response: Any, context: grpc.ServicerContext, request_id: str, outcome: str
    ) -> AuditEvent:
        principal = current_principal.get()
        return AuditEvent(
            rpc=_short(method),
            tenant=_text(request, "tenant_id"),
            principal=principal.name if principal else "",
            auth=principal.method if principal else "none",
            outcome=outcome,
            request_id=request_id,
            peer=_peer(context),
            key_id=_key_id(request, response),
            key_version=_key_version(response) if response is not None else 0,
            phase="intent" if outcome == "PENDING" else "outcome",
        )

    @staticmethod
    def records_first(method: str) -> bool:
        """Whether `method` gets a record before its handler runs (decided once, when it is registered)."""
        return _short(method) in _RECORDED_BEFORE

    def before(self, method: str, request: Any, context: grpc.ServicerContext, request_id: str) -> None:
        """The intent record of a key change or admin call. Raises AuditUnavailable: the call must not run."""
        self.trail.record(self._event(method, request, None, context, request_id, "PENDING"))

    def finished(
        self,
        method: str,
        request: Any,
        response: Any,
        context: grpc.ServicerContext,
        request_id: str,
        code: grpc.StatusCode,
        intent_written: bool,
    ) -> None:
        """Record the outcome of a call, when the table says so."""
        name = _short(method)
        if name in _RECORDED_BEFORE:
            if intent_written:
                # Logged by the trail when it fails; the change is made and its intent is in the chain.
                with contextlib.suppress(AuditUnavailable):
                    self.trail.record(self._event(method, request, response, context, request_id, code.name))
                return
        elif name in CRYPTO_OPERATIONS and self._wants_crypto(code):
            self.trail.submit(self._event(method, request, response, context, request_id, code.name))
            return
        if code in _DENIALS:
            self.trail.submit(self._event(method, request, response, context, request_id, code.name))

    def _wants_crypto(self, code: grpc.StatusCode) -> bool:
        mode = self._crypto.mode
        if mode == "all":
            return True
        if mode == "none":
            return False
        if code is not grpc.StatusCode.OK:
            return True
        return mode == "sampled" and next(self._sampled) % self._crypto.every == 0
