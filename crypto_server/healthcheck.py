"""`crypto-healthcheck`: a gRPC health check of the local server, for container HEALTHCHECKs.

Exit 0 when `grpc.health.v1.Health/Check` answers SERVING for the server (or
the service named by the first argument) on 127.0.0.1:$CRYPTO_PORT within two
seconds; exit 1 otherwise. Shipped in the package so the image needs no
downloaded probe binary.
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main() -> int:
    port = os.environ.get("CRYPTO_PORT", "3009")
    service = sys.argv[1] if len(sys.argv) > 1 else ""
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2
            )
    except grpc.RpcError as error:
        print(f"unhealthy: {error.code().name}", file=sys.stderr)
        return 1
    serving = answer.status == health_pb2.HealthCheckResponse.SERVING
    print(health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status))
    return 0 if serving else 1


if __name__ == "__main__":
    raise SystemExit(main())
