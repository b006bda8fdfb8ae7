"""The crypto server plus a bench-only empty RPC, the baseline every figure is compared with.

`/caas.bench.v1.Echo/Empty` takes and returns raw bytes, without the crypto
service's interceptor: it is what a gRPC call costs on this machine with
nothing else. It exists only here (bench/ is not part of the package), so no
production server ever has it.

    python -m bench.echo_server     # configured by the same environment as crypto-server
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from crypto_server.__main__ import main

ECHO_METHOD = "/caas.bench.v1.Echo/Empty"
ECHO_STREAM_METHOD = "/caas.bench.v1.Echo/Stream"


def _empty(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """Every message back as it came: the baseline for streaming encryption."""
    yield from requests


def add_echo_service(server: grpc.Server) -> None:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Empty": grpc.unary_unary_rpc_method_handler(_empty),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("caas.bench.v1.Echo", handlers),))


if __name__ == "__main__":
    raise SystemExit(main(register=[add_echo_service], worker_module="bench.echo_server"))
