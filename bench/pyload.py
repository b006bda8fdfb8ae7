"""A Python (grpc.aio) load generator: the cross-check for h2load, and the driver for multi-step scenarios."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import grpc

from bench.h2load import LoadResult


async def _drive(call: Callable[[], Awaitable[object]], *, requests: int, in_flight: int) -> LoadResult:
    latencies: list[float] = []
    remaining = requests
    failed = 0

    async def worker() -> None:
        nonlocal remaining, failed
        while remaining > 0:
            remaining -= 1
            started = time.perf_counter()
            try:
                await call()
            except grpc.RpcError:
                failed += 1
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    quantiles = statistics.quantiles(sorted(latencies), n=100, method="inclusive")
    return LoadResult(
        rps=len(latencies) / elapsed,
        p50_ms=quantiles[49] * 1000,
        p99_ms=quantiles[98] * 1000,
        succeeded=len(latencies) - failed,
        failed=failed,
    )


def run(
    address: str,
    method: str,
    message: bytes,
    *,
    requests: int,
    in_flight: int,
    credentials: grpc.ChannelCredentials | None = None,
) -> LoadResult:
    """Like h2load.run, with a Python client: raw bytes in and out, so no protobuf cost on the client. With
    `credentials`, over TLS (one channel: the handshake is paid once, as by a long-lived client)."""

    def open_channel() -> grpc.aio.Channel:
        if credentials is None:
            return grpc.aio.insecure_channel(address)
        return grpc.aio.secure_channel(address, credentials)

    async def main() -> LoadResult:
        async with open_channel() as channel:
            stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
                method, request_serializer=None, response_deserializer=None
            )

            async def call() -> object:
                return await stub(message, timeout=30)

            return await _drive(call, requests=requests, in_flight=in_flight)

    return asyncio.run(main())


def run_calls(calls: list[Callable[[grpc.aio.Channel], Awaitable[object]]], address: str, *, in_flight: int) -> float:
    """Run each call once (`in_flight` at a time); the calls per second, retries included. A call the server sheds
    (UNAVAILABLE: more calls waiting for the key store than it admits) is retried after a short back-off, as
    the client library does; any other failure, or a call still shed after `_SHED_RETRIES` tries, raises."""

    async def main() -> float:
        async with grpc.aio.insecure_channel(address) as channel:
            pending = list(calls)
            started = time.perf_counter()

            async def worker() -> None:
                while pending:
                    await _retrying_shed(pending.pop(), channel)

            await asyncio.gather(*(worker() for _ in range(in_flight)))
            return len(calls) / (time.perf_counter() - started)

    return asyncio.run(main())


_SHED_RETRIES = 8


async def _retrying_shed(call: Callable[[grpc.aio.Channel], Awaitable[object]], channel: grpc.aio.Channel) -> None:
    for attempt in range(_SHED_RETRIES):
        try:
            await call(channel)
            return
        except grpc.aio.AioRpcError as error:
            if error.code() != grpc.StatusCode.UNAVAILABLE or attempt == _SHED_RETRIES - 1:
                raise
            await asyncio.sleep(0.02 * 2**attempt)
