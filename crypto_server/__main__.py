"""`python -m crypto_server` / `crypto-server`: run the service until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence

import grpc

from crypto_server.app import build_server
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.errors import RootKeyUnavailable, StoreUnavailable
from crypto_server.log_format import configure_logging, stop_logging

log = logging.getLogger("crypto_server")


def main(register: Sequence[Callable[[grpc.Server], None]] = ()) -> int:
    """Run until SIGTERM/SIGINT; exit code 0 after a clean stop, 2 for a configuration or start-up error.

    `register` adds services to the server before it starts (the benchmark's echo baseline uses it).
    """
    try:
        settings = Settings.from_env()
    except ConfigError as error:
        print(f"crypto-server: configuration error: {error}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    stop_requested = threading.Event()
    received: list[str] = []

    def request_stop(signum: int, _frame: object) -> None:
        # Only set a flag here: logging from a signal handler can deadlock on the handler's lock.
        received.append(signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        running = build_server(settings, register=register)
    except (ConfigError, StoreUnavailable) as error:
        log.error("cannot start: %s", error)
        return 2
    except RootKeyUnavailable as error:
        log.error("cannot start: %s (%s)", error, error.detail)
        return 2
    log.info(
        "serving",
        extra={
            "host": settings.host,
            "port": running.port,
            "data_dir": str(settings.data_dir),
            "workers": settings.workers,
            "metrics_port": running.metrics_port,
        },
    )
    stop_requested.wait()
    log.info(
        "stopping",
        extra={"signal": received[0], "drain_s": settings.shutdown_drain_s, "grace_s": settings.shutdown_grace_s},
    )
    running.stop(settings.shutdown_grace_s, drain_s=settings.shutdown_drain_s)
    log.info("stopped")
    stop_logging()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
