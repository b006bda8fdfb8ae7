"""`python -m crypto_server` / `crypto-server`: run the service until SIGTERM or SIGINT.

Exit codes (docs/operations.md, "Start-up"): 0 after a clean stop; 1 an unexpected error; 2 a configuration
error (a setting, the root key, a store that is not this root key's); 3 the key store did not answer at
start-up (MongoDB unreachable: fix the network or the database, not the configuration). Every start-up error
is one JSON log line on stderr, like every other log line.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from urllib.parse import urlsplit

import grpc
from pymongo.errors import ConfigurationError as MongoConfigurationError

from crypto_server.app import build_server
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import RootKeyUnavailable, StoreUnavailable
from crypto_server.log_format import configure_logging, stop_logging
from crypto_server.supervisor import WorkerLink, supervise, worker_environment

log = logging.getLogger("crypto_server")
EXIT_OK, EXIT_UNEXPECTED, EXIT_CONFIG, EXIT_STORE_UNREACHABLE = 0, 1, 2, 3


def _hosts(uri: str) -> str:
    """The host list of a MongoDB or Redis URI, without user name or password (never logged)."""
    if uri.startswith("unix://"):
        return urlsplit(uri).path
    authority = uri.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0]
    return authority.rpartition("@")[2]


def store_description(settings: Settings) -> dict[str, object]:
    """What the start-up line says about the store in use: where, never with credentials."""
    if settings.mongodb_uri:
        store: dict[str, object] = {
            "store": "mongodb",
            "mongodb_hosts": _hosts(settings.mongodb_uri),
            "mongodb_database": settings.mongodb_database,
        }
    else:
        store = {"store": "embedded", "store_path": str(settings.data_dir.resolve())}
    if settings.redis_url:
        database = urlsplit(settings.redis_url).path.strip("/") if settings.redis_url.startswith("redis") else ""
        store["redis_host"] = _hosts(settings.redis_url) + (f"/{database}" if database else "")
    return store


def security_description(settings: Settings) -> dict[str, object]:
    """The security mode: the transport, and where the root key comes from."""
    if settings.root_key:
        source = "CRYPTO_ROOT_KEY"
    elif settings.root_key_file:
        source = "CRYPTO_ROOT_KEY_FILE"
    else:
        source = "generated (development only)"
    if settings.tls_client_ca_file is not None:
        transport = "mTLS (client certificates required)"
    elif settings.tls:
        transport = "TLS"
    else:
        transport = "plaintext gRPC (no TLS; docs/security.md)"
    return {
        "transport": transport,
        "access_policy": str(settings.policy_file) if settings.policy_file else "none (every caller may do anything)",
        "bearer_tokens": settings.jwks_file is not None,
        "reflection": settings.reflection_enabled,
        "root_key_source": source,
        "allow_insecure_root_key_file": settings.allow_insecure,
    }


def _refuse_start(message: str, code: int, **fields: object) -> int:
    log.error(message, extra={"exit_code": code, **fields})
    stop_logging()
    return code


def _announce_serving(settings: Settings, fields: Mapping[str, object], *, message: str = "serving") -> None:
    """The start-up line (the one line that says where, which store and how secure), then the INSECURE warning."""
    log.info(
        message,
        extra={
            "host": settings.host,
            **store_description(settings),
            **security_description(settings),
            "workers": settings.workers,
            **fields,
        },
    )
    if message == "serving" and (not settings.tls or settings.policy_file is None):
        log.warning(
            "INSECURE: %s; fine for development on this machine, never for production (docs/security.md)",
            "no TLS" if not settings.tls else "no access policy",
            extra={"host": settings.host, "allow_insecure": settings.allow_insecure},
        )


def main(
    register: Sequence[Callable[[grpc.Server], None]] = (),
    *,
    worker_module: str = "crypto_server",
    clock: Clock | None = None,
) -> int:
    """Run until SIGTERM/SIGINT; the exit code (module docstring).

    `register` adds services to the server before it starts (the benchmark's echo baseline uses it). With
    CRYPTO_PROCESSES above 1 this process supervises that many `python -m <worker_module>` workers
    (crypto_server/supervisor.py); `worker_module` must call main with the same `register`. `clock` replaces
    the system clock; only code can pass one (no setting does), so only a test's own entry point
    (tests/reliability/clocked_server.py) runs the service on another clock.
    """
    configure_logging("INFO")  # JSON from the first line on, even for a configuration error
    try:
        settings = Settings.from_env(worker_environment())
    except ConfigError as error:
        return _refuse_start(f"configuration error: {error}", EXIT_CONFIG)
    configure_logging(settings.log_level)
    if settings.processes > 1:
        code = supervise(settings, worker_module=worker_module, announce=partial(_announce_serving, settings))
        stop_logging()
        return code
    link = WorkerLink.from_env()
    stop_requested = threading.Event()
    received: list[str] = []

    def request_stop(signum: int, _frame: object) -> None:
        # Only set a flag here: logging from a signal handler can deadlock on the handler's lock.
        received.append(signal.Signals(signum).name)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    store = store_description(settings)
    try:
        running = build_server(settings, clock=clock, register=register)
    except (ConfigError, MongoConfigurationError) as error:
        return _refuse_start(f"cannot start: configuration error: {error}", EXIT_CONFIG, **store)
    except RootKeyUnavailable as error:
        # The HSM named in the settings cannot be used (wrong PIN, token or label): a configuration error.
        return _refuse_start(f"cannot start: {error.message} ({error.detail})", EXIT_CONFIG, **store)
    except StoreUnavailable as error:
        where = store.get("mongodb_hosts") or store.get("store_path")
        return _refuse_start(
            f"cannot start: the key store at {where} did not answer: {error}", EXIT_STORE_UNREACHABLE, **store
        )
    except Exception as error:
        log.exception("cannot start: unexpected error", extra={"exit_code": EXIT_UNEXPECTED, "error": repr(error)})
        stop_logging()
        return EXIT_UNEXPECTED
    served = {"port": running.port, "metrics_port": running.metrics_port, "health_port": running.health_port}
    if link is None:
        _announce_serving(settings, served)
    else:
        _announce_serving(settings, {**served, "worker": link.index}, message="worker serving")

        def orphaned() -> None:
            received.append("supervisor gone")
            stop_requested.set()

        link.serving(running, interval_s=settings.health_interval_s, on_orphaned=orphaned)
    stop_requested.wait()
    log.info(
        "stopping",
        extra={"signal": received[0], "drain_s": settings.shutdown_drain_s, "grace_s": settings.shutdown_grace_s},
    )
    running.stop(settings.shutdown_grace_s, drain_s=settings.shutdown_drain_s)
    if link is not None:
        link.close()
    log.info("stopped")
    stop_logging()
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
