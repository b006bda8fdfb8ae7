"""The crypto server plus a bench-only empty RPC, the baseline every figure is compared with.

`/caas.bench.v1.Echo/Empty` takes and returns raw bytes, without the crypto
service's interceptor: it is what a gRPC call costs on this machine with
nothing else. `/caas.bench.v1.Echo/Seal` is the floor of an Encrypt: it parses
an EncryptRequest, seals its plaintext with AES-GCM under one key it holds, and
answers an EncryptResponse, with nothing else (no key lookup, state check,
middleware, quota, metrics or log line): what carrying an Encrypt's bytes and
its cipher costs on this server. Both exist only here (bench/ is not part of
the package), so no production server ever has them.

    python -m bench.echo_server     # configured by the same environment as crypto-server
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_server.__main__ import main
from crypto_server.domain.nonces import random_nonce

ECHO_METHOD = "/caas.bench.v1.Echo/Empty"
ECHO_STREAM_METHOD = "/caas.bench.v1.Echo/Stream"
SEAL_METHOD = "/caas.bench.v1.Echo/Seal"

_FLOOR_KEY = AESGCM(AESGCM.generate_key(256))


def _empty(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _seal(request: crypto_pb.EncryptRequest, context: grpc.ServicerContext) -> crypto_pb.EncryptResponse:
    """The floor of an Encrypt: the same message parsed, the same cipher, the same answer's shape."""
    nonce = random_nonce()
    sealed = _FLOOR_KEY.encrypt(nonce, request.plaintext, request.aad or None)
    return crypto_pb.EncryptResponse(ciphertext=nonce + sealed, key_id=request.key_id, key_version=1)


def _stream(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
    """Every message back as it came: the baseline for streaming encryption."""
    yield from requests


def add_echo_service(server: grpc.Server) -> None:
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Empty": grpc.unary_unary_rpc_method_handler(_empty),
        "Seal": grpc.unary_unary_rpc_method_handler(
            _seal,
            request_deserializer=crypto_pb.EncryptRequest.FromString,
            response_serializer=crypto_pb.EncryptResponse.SerializeToString,
        ),
        "Stream": grpc.stream_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("caas.bench.v1.Echo", handlers),))


if __name__ == "__main__":
    raise SystemExit(main(register=[add_echo_service], worker_module="bench.echo_server"))
