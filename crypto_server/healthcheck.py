"""`crypto-healthcheck`: a grpc.health.v1 check, a drop-in for grpc-health-probe in container and pod probes.

Shipped in the package so the image needs no downloaded probe binary. Options and exit codes follow
grpc-health-probe's (github.com/grpc-ecosystem/grpc-health-probe):

    0  SERVING
    1  invalid arguments (or a certificate file that cannot be read)
    2  connection failure: nothing listens, the TLS handshake failed, or no connection within --connect-timeout
    3  RPC failure: the Check call failed or took longer than --rpc-timeout (an unknown --service included)
    4  unhealthy: the answer was NOT_SERVING, UNKNOWN or SERVICE_UNKNOWN

Without --addr it checks the server in the same container: 127.0.0.1:$CRYPTO_HEALTH_PORT when that plaintext
health port is set (the service port then usually requires mTLS), else 127.0.0.1:$CRYPTO_PORT (3009).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING, EXIT_INVALID_ARGUMENTS, EXIT_CONNECTION_FAILURE, EXIT_RPC_FAILURE, EXIT_UNHEALTHY = 0, 1, 2, 3, 4


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse would exit 2, which means "connection failure" to a probe.
        raise _UsageError(message)


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="crypto-healthcheck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root.add_argument(
        "--addr",
        default=f"127.0.0.1:{os.environ.get('CRYPTO_HEALTH_PORT') or os.environ.get('CRYPTO_PORT') or '3009'}",
        metavar="HOST:PORT",
        help="the server (default 127.0.0.1:$CRYPTO_HEALTH_PORT, else $CRYPTO_PORT, else 3009)",
    )
    root.add_argument("--service", default="", help="the service to check, e.g. caas.crypto.v1.KeyService (the server)")
    root.add_argument("--connect-timeout", type=float, default=2.0, metavar="SECONDS", help="to connect (2)")
    root.add_argument("--rpc-timeout", type=float, default=2.0, metavar="SECONDS", help="for the Check call (2)")
    root.add_argument("--tls", action="store_true", help="connect with TLS (implied by --ca, --cert and --key)")
    root.add_argument("--ca", type=Path, metavar="FILE", help="PEM CA certificates to verify the server (system roots)")
    root.add_argument("--cert", type=Path, metavar="FILE", help="PEM client certificate, for a server that asks (mTLS)")
    root.add_argument("--key", type=Path, metavar="FILE", help="PEM private key of --cert")
    root.add_argument("--tls-server-name", metavar="NAME", help="the name to verify in the server's certificate")
    return root


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if not (args.tls or args.ca or args.cert or args.key):
        return grpc.insecure_channel(args.addr)
    if bool(args.cert) != bool(args.key):
        raise _UsageError("--cert and --key go together")
    try:
        root_certificates = args.ca.read_bytes() if args.ca else None
        certificate_chain = args.cert.read_bytes() if args.cert else None
        private_key = args.key.read_bytes() if args.key else None
    except OSError as error:
        raise _UsageError(f"cannot read {error.filename}: {error.strerror}") from None
    credentials = grpc.ssl_channel_credentials(root_certificates, private_key, certificate_chain)
    options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
    return grpc.secure_channel(args.addr, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[int, str]:
    """The exit code and the line to print."""
    with _channel(args) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=args.connect_timeout)
        except grpc.FutureTimeoutError:
            return EXIT_CONNECTION_FAILURE, f"error: no connection to {args.addr} within {args.connect_timeout}s"
        try:
            answer = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.rpc_timeout
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else grpc.StatusCode.UNKNOWN
            details = error.details() if isinstance(error, grpc.Call) else ""
            return EXIT_RPC_FAILURE, f"error: health rpc failed: {code.name}: {details}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    if answer.status != health_pb2.HealthCheckResponse.SERVING:
        return EXIT_UNHEALTHY, f"service unhealthy (responded with {status})"
    return EXIT_SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        code, line = check(args)
    except _UsageError as error:
        print(f"crypto-healthcheck: {error} (see crypto-healthcheck --help)", file=sys.stderr)
        return EXIT_INVALID_ARGUMENTS
    print(line, file=sys.stdout if code == EXIT_SERVING else sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
