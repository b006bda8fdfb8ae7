"""A server interceptor that injects faults on demand and counts attempts, for client tests."""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

HOLD_LIMIT_S = 30.0  # a held call is let go after this long anyway, so a failing test ends


@dataclass(frozen=True)
class Fault:
    code: grpc.StatusCode | None = None  # answer with this status instead of calling the service
    delay_s: float = 0.0  # wait this long first
    # Answer only once the test sets this event (a server slower than any deadline, without guessing how slow).
    hold: threading.Event | None = None
    lose_response: bool = False  # call the service, then answer UNAVAILABLE as if the response was lost


class FaultInjector(grpc.ServerInterceptor):
    def __init__(self) -> None:
        self.attempts: Counter[str] = Counter()
        self.request_ids: defaultdict[str, list[str]] = defaultdict(list)  # per method, each attempt's x-request-id
        self.held = 0  # calls answering only once their Fault's `hold` is set
        self._planned: defaultdict[str, deque[Fault]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _holding(self, change: int) -> None:
        with self._lock:
            self.held += change

    def plan(self, method: str, *faults: Fault) -> None:
        """Faults for the next calls of `method` ("CreateKey", "Encrypt", ...), one per call."""
        with self._lock:
            self._planned[method].extend(faults)

    def _next_fault(self, method: str) -> Fault | None:
        with self._lock:
            self.attempts[method] += 1
            planned = self._planned[method]
            return planned.popleft() if planned else None

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(details)
        if handler is None or handler.unary_unary is None or not details.method.startswith("/caas.crypto.v1."):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        behaviour = handler.unary_unary

        def faulty(request: Any, context: grpc.ServicerContext) -> Any:
            self.request_ids[method].append(dict(context.invocation_metadata()).get("x-request-id", ""))
            fault = self._next_fault(method)
            if fault is None:
                return behaviour(request, context)
            if fault.hold is not None:
                self._holding(+1)
                try:
                    fault.hold.wait(timeout=HOLD_LIMIT_S)
                finally:
                    self._holding(-1)
            if fault.delay_s:
                time.sleep(fault.delay_s)  # a slow server: this real gRPC handler thread answers late
            if fault.code is not None:
                context.abort(fault.code, f"injected {fault.code.name}")
            response = behaviour(request, context)
            if fault.lose_response:
                context.abort(grpc.StatusCode.UNAVAILABLE, "injected: response lost")
            return response

        return grpc.unary_unary_rpc_method_handler(
            faulty,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
