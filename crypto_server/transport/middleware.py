"""Cross-cutting concerns for every caas.crypto.v1 RPC, in one middleware:

- a request id (the caller's `x-request-id` metadata, or a new one), echoed back;
- who is calling and whether it may (transport/authorization.py), before anything else runs; the caller
  is `call_context.current_principal` for the whole call;
- domain errors turned into rich statuses through the error table;
- a last-resort INTERNAL that reveals nothing, for bugs;
- a request body that does not parse becomes INVALID_ARGUMENT, not INTERNAL;
- per-tenant quotas (service/quotas.py), charged before the handler runs;
- streams: a cap on how many run at once and an idle timeout (transport/streams.py);
- a response too large to send becomes RESOURCE_EXHAUSTED here, so the log line and the
  metrics say what the caller got rather than OK;
- one structured log line per RPC, with the status the caller received (every RPC, or per CRYPTO_ACCESS_LOG only
  those that did not end OK, plus one success in N: transport/access_log.py);
- a count of calls in flight, so shutdown can wait for the server to go quiet;
- the audit trail (transport/call_audit.py): an intent record before a key change runs, and the outcome
  record of the calls it covers (every denial among them) when the call ends.
"""

from __future__ import annotations

import itertools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message

from crypto_server.call_context import ANONYMOUS, current_principal
from crypto_server.domain.errors import CryptoServiceError, InvalidArgument, ResponseTooLarge, ServerShuttingDown
from crypto_server.log_format import AccessLogMode
from crypto_server.service.quotas import NoQuotas, Quotas
from crypto_server.transport import access_log
from crypto_server.transport.authorization import AccessControl
from crypto_server.transport.call_audit import CallAudit
from crypto_server.transport.call_deadline import enter_call, leave_call
from crypto_server.transport.errors import REQUEST_ID_HEADER, internal_status, status_for
from crypto_server.transport.metrics import NullRpcObserver, RpcObserver
from crypto_server.transport.stream_messages import stream_request_deserializer, stream_response_serializer
from crypto_server.transport.streams import (
    DEFAULT_STREAM_IDLE_TIMEOUT_S,
    IdleLimitedRequests,
    StreamSlots,
    default_max_streams,
)

_REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_LOGGED_TEXT_CHARS = 128
# Until callers prove who they are, every call acts as this principal.
rpc_log = logging.getLogger(access_log.LOGGER_NAME)


class _MalformedRequest:
    """Stands in for a request whose bytes did not parse, so the handler can answer INVALID_ARGUMENT."""


_MALFORMED = _MalformedRequest()


def _tolerant(deserialize: Callable[[bytes], Message]) -> Callable[[bytes], Message | _MalformedRequest]:
    def parse(data: bytes) -> Message | _MalformedRequest:
        try:
            return deserialize(data)
        except DecodeError:
            return _MALFORMED

    return parse


# Generated request ids: a per-process random prefix and a counter; unique without a syscall per call.
_REQUEST_ID_PREFIX = secrets.token_hex(6)
_request_numbers = itertools.count(1)


def _request_id(context: grpc.ServicerContext) -> str:
    for name, value in context.invocation_metadata():
        if name == REQUEST_ID_HEADER and isinstance(value, str) and _REQUEST_ID_PATTERN.fullmatch(value):
            return value
    return f"{_REQUEST_ID_PREFIX}-{next(_request_numbers)}"


def _text_field(request: object, name: str) -> str:
    value = getattr(request, name, "")
    return value[:_LOGGED_TEXT_CHARS] if isinstance(value, str) else ""


class InFlightCalls:
    """How many RPCs are running, when the last one finished, and whether new ones are still taken."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._count = 0
        self._last_finished = time.monotonic()
        self._refusing = False

    def enter(self) -> bool:
        """Count a call in; False when the server is shutting down (the call is then refused, not counted)."""
        with self._lock:
            if self._refusing:
                self._last_finished = time.monotonic()
                return False
            self._count += 1
            return True

    def refuse_new_calls(self) -> None:
        """From now on every new call is answered UNAVAILABLE at once (the server is about to stop)."""
        with self._lock:
            self._refusing = True

    def leave(self) -> None:
        with self._lock:
            self._count -= 1
            self._last_finished = time.monotonic()

    @property
    def count(self) -> int:
        with self._lock:
            return self._count

    def quiet_for(self) -> float:
        """Seconds since the last call finished, or 0 while any call is running."""
        with self._lock:
            return 0.0 if self._count else time.monotonic() - self._last_finished


def _failure(error: CryptoServiceError, request_id: str, observer: RpcObserver) -> tuple[grpc.StatusCode, grpc.Status]:
    """The status a failed call ends with, the error counted."""
    observer.failed(error)
    return status_for(error, request_id)


def _bug(method: str, request_id: str) -> tuple[grpc.StatusCode, grpc.Status]:
    """The last resort: logged with its traceback, answered with nothing but the request id."""
    rpc_log.exception("unhandled error", extra={"method": method, "request_id": request_id})
    return grpc.StatusCode.INTERNAL, internal_status(request_id)


@dataclass(frozen=True)
class RpcLimits:
    """The limits the middleware enforces on every call (docs/security.md, "Resource limits")."""

    streams: StreamSlots = field(default_factory=lambda: StreamSlots(default_max_streams(16)))
    stream_idle_timeout_s: float = DEFAULT_STREAM_IDLE_TIMEOUT_S
    quotas: Quotas = field(default_factory=NoQuotas)
    # The server's grpc.max_send_message_length: a larger response would fail in grpc, after the handler.
    max_response_bytes: int = 16 * 1024 * 1024


def _cost(request: Any) -> int:
    """What a batch costs against the tenant's quota: one per item."""
    return len(request.items) or 1


class RpcMiddleware:
    """Wraps each caas.crypto.v1 method handler once, when the service is registered.

    Not a grpc.ServerInterceptor: grpc runs interceptors per call (a pipeline
    of closures for every RPC), which measurably slowed the hot path. Wrapping
    the handler table once does the same job at no per-call dispatch cost.
    """

    def __init__(
        self,
        in_flight: InFlightCalls | None = None,
        observer: RpcObserver | None = None,
        limits: RpcLimits | None = None,
        access: AccessControl | None = None,
        audit: CallAudit | None = None,
        access_log_mode: AccessLogMode | None = None,
    ) -> None:
        """`access`: identify and authorize callers (None: development, every caller is anonymous).
        `access_log_mode`: which calls get an access line (None: every call)."""
        self.in_flight = in_flight or InFlightCalls()
        self.access = access
        self._observer: RpcObserver = observer or NullRpcObserver()
        self.limits = limits or RpcLimits()
        self.audit = audit
        self.access_lines = access_log.LineSelection(access_log_mode)

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any], *, per_item: bool = False
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """`per_item`: the request is a batch (an `items` field), charged one quota token per item."""
        behaviour, deserialize = handler.unary_unary, handler.request_deserializer
        if behaviour is None or deserialize is None:
            raise ValueError(f"{method}: a unary handler with a request deserializer is needed")
        return grpc.unary_unary_rpc_method_handler(
            self._wrap(method, behaviour, per_item),
            request_deserializer=_tolerant(deserialize),
            response_serializer=handler.response_serializer,
        )

    def wrap_stream(self, method: str, handler: grpc.RpcMethodHandler[Any, Any]) -> grpc.RpcMethodHandler[Any, Any]:
        behaviour, deserialize = handler.stream_stream, handler.request_deserializer
        if behaviour is None or deserialize is None:
            raise ValueError(f"{method}: a streaming handler with a request deserializer is needed")
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(method, behaviour),
            request_deserializer=_tolerant(deserialize),
            response_serializer=handler.response_serializer,
        )

    def _wrap_stream(
        self, method: str, behaviour: Callable[[Iterator[Any], grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[..., Iterator[Any]]:
        """The unary wrapper's duties for a bidirectional stream; the log line is written when it ends."""
        in_flight = self.in_flight
        observer = self._observer
        observe = observer.for_method(method)
        wants_line = self.access_lines.wants
        limits = self.limits
        access = self.access
        rpc_name = method.rsplit("/", 1)[-1]
        audit = self.audit

        def handle(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
            current_principal.set(ANONYMOUS)
            entered = in_flight.enter()
            started = time.perf_counter()
            request_id = _request_id(context)
            code = grpc.StatusCode.OK
            first: list[Any] = []
            slot_taken = False
            idle_limited = IdleLimitedRequests(requests, limits.stream_idle_timeout_s)

            def checked() -> Iterator[Any]:
                for request in idle_limited:
                    if request is _MALFORMED:
                        raise InvalidArgument("request", "a stream message is not a valid protobuf message")
                    if not first:
                        first.append(request)
                        # -- authorization (on the opening message, which names the tenant and key) --
                        if access is not None:
                            access.authorize(rpc_name, current_principal.get() or ANONYMOUS, request)
                        # -- end of authorization --
                        limits.quotas.charge(getattr(request, "tenant_id", ""))
                    yield request

            try:
                if not entered:
                    raise ServerShuttingDown()
                # -- authentication --
                if access is not None:
                    current_principal.set(access.identify(context))
                # -- end of authentication --
                limits.streams.take()
                slot_taken = True
                deadline = enter_call(context.time_remaining())
                try:
                    yield from behaviour(checked(), context)
                finally:
                    leave_call(deadline)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
            except CryptoServiceError as error:
                code, status = _failure(error, request_id, observer)
                context.abort_with_status(status)
            except grpc.RpcError:
                # Reading the next message failed: the caller cancelled, or its connection went away.
                code = grpc.StatusCode.CANCELLED
            except Exception:
                code, status = _bug(method, request_id)
                context.abort_with_status(status)
            finally:
                idle_limited.close()
                if slot_taken:
                    limits.streams.give_back()
                if code is grpc.StatusCode.OK and not context.is_active():
                    # grpc stopped taking responses (the caller cancelled or went away): not an OK.
                    code = grpc.StatusCode.CANCELLED
                if entered:
                    in_flight.leave()
                elapsed = time.perf_counter() - started
                observe(code.name, elapsed)
                if audit is not None:
                    audit.finished(method, first[0] if first else None, None, context, request_id, code, False)
                if access_log.enabled() and wants_line(code is grpc.StatusCode.OK):
                    opening = first[0] if first else None
                    access_log.record(
                        method,
                        _text_field(opening, "tenant_id"),
                        _text_field(opening, "key_id"),
                        code.name,
                        elapsed * 1000,
                        request_id,
                    )
                # Last: the lines above may read it. Not reset(): a generator may be closed in another context.
                current_principal.set(None)

        return handle

    def _wrap(
        self, method: str, behaviour: Callable[[Any, grpc.ServicerContext], Any], per_item: bool
    ) -> Callable[..., Any]:
        in_flight = self.in_flight
        observer = self._observer
        # Resolved once per method here, not per call: the metric series' label children, the line selection.
        observe = observer.for_method(method)
        log_calls = access_log.enabled
        wants_line = self.access_lines.wants
        ok = grpc.StatusCode.OK
        charge = self.limits.quotas.charge
        max_response_bytes = self.limits.max_response_bytes
        access = self.access
        rpc_name = method.rsplit("/", 1)[-1]
        audit = self.audit
        audit_first = audit is not None and audit.records_first(method)

        def handle(request: Any, context: grpc.ServicerContext) -> Any:
            principal_token = current_principal.set(ANONYMOUS)
            entered = in_flight.enter()
            started = time.perf_counter()
            request_id = _request_id(context)
            code = ok
            response = None
            intent_recorded = False
            try:
                if not entered:
                    raise ServerShuttingDown()
                # -- authentication and authorization (transport/authorization.py) --
                narrow_response = None
                if access is not None:
                    principal = access.identify(context)
                    current_principal.set(principal)
                if request is _MALFORMED:
                    raise InvalidArgument("request", "the request body is not a valid protobuf message")
                if access is not None:
                    narrow_response = access.authorize(rpc_name, principal, request)
                # -- end of authentication and authorization --
                charge(getattr(request, "tenant_id", ""), _cost(request) if per_item else 1)
                if audit_first and audit is not None:
                    # Before the change: when this record cannot be written, the change is not made.
                    audit.before(method, request, context, request_id)
                    intent_recorded = True
                deadline = enter_call(context.time_remaining())
                try:
                    response = behaviour(request, context)
                finally:
                    leave_call(deadline)
                if narrow_response is not None:
                    response = narrow_response(response)
                # grpc would refuse to send it (RESOURCE_EXHAUSTED) after this returns, unseen by the log line.
                size = response.ByteSize()
                if size > max_response_bytes:
                    raise ResponseTooLarge(size, max_response_bytes)
                # In the trailers, sent with the status: no extra round of the completion queue.
                context.set_trailing_metadata(((REQUEST_ID_HEADER, request_id),))
                return response
            except CryptoServiceError as error:
                code, status = _failure(error, request_id, observer)
                context.abort_with_status(status)
            except Exception:
                code, status = _bug(method, request_id)
                context.abort_with_status(status)
            finally:
                if entered:
                    in_flight.leave()
                elapsed = time.perf_counter() - started
                observe(code.name, elapsed)
                if audit is not None and request is not _MALFORMED:
                    audit.finished(method, request, response, context, request_id, code, intent_recorded)
                # The mode decides only this line: the metrics and the audit trail above see every call.
                if log_calls() and wants_line(code is ok):
                    access_log.record(
                        method,
                        _text_field(request, "tenant_id"),
                        # CreateKey has no key id until it answers.
                        _text_field(request, "key_id") or _text_field(getattr(response, "key", None), "key_id"),
                        code.name,
                        elapsed * 1000,
                        request_id,
                    )
                current_principal.reset(principal_token)  # last: the lines above may read it

        return handle


def add_service(
    server: grpc.Server,
    service: ServiceDescriptor,
    servicer: object,
    middleware: RpcMiddleware,
) -> None:
    """Register `servicer`'s methods for `service` (unary or bidirectional streaming), wrapped once."""
    handlers = {}
    for method in service.methods:
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        name = f"/{service.full_name}/{method.name}"
        behaviour = getattr(servicer, method.name)
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = middleware.wrap_stream(
                name,
                grpc.stream_stream_rpc_method_handler(
                    behaviour,
                    request_deserializer=stream_request_deserializer(request_class),
                    # The streaming handlers answer with responses already encoded (transport/stream_messages.py).
                    response_serializer=stream_response_serializer(response_class.SerializeToString),
                ),
            )
            continue
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{name}: only unary and bidirectional streaming methods are supported")
        handler = grpc.unary_unary_rpc_method_handler(
            behaviour,
            request_deserializer=request_class.FromString,
            response_serializer=response_class.SerializeToString,
        )
        per_item = "items" in method.input_type.fields_by_name
        handlers[method.name] = middleware.wrap(name, handler, per_item=per_item)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)
