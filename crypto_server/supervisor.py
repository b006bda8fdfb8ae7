"""`CRYPTO_PROCESSES=N`: N server processes sharing one port, under a supervisor.

One Python process serves on about one core (grpc's Python server runs under the GIL); N worker
processes on one port use N cores. `python -m crypto_server` with CRYPTO_PROCESSES above 1 becomes this
supervisor, which serves no call itself:

- The port: the supervisor binds it once with SO_REUSEPORT and keeps that socket open, bound but never
  listening (the kernel hands connections only to listening sockets). Port 0 so becomes one concrete port for
  every worker, and no other program can take it while a worker restarts. Each worker runs the same module
  with CRYPTO_PORT set to it, CRYPTO_REUSE_PORT=1 and CRYPTO_PROCESSES=1; the kernel spreads new connections
  over the workers.
- Start-up: worker 0 starts first, the others once it serves, so one process initialises a new store (schema,
  root key check, metadata key, development root key). A worker that fails before it serves stops the whole
  server with that worker's exit code (2: configuration, 3: store unreachable): it fails fast, no restart loop.
- Health: each worker reports over a pipe once it serves, then its health every CRYPTO_HEALTH_INTERVAL. The
  supervisor serves the plaintext health port (CRYPTO_HEALTH_PORT) itself: a service is SERVING only while
  every worker reports it SERVING and has been heard from recently. (Each worker on a shared health port would
  answer a probe at random: a dead or stuck worker would go unnoticed.) The main port's health service is
  answered by whichever worker the connection reached, as before.
- The root key from CRYPTO_ROOT_KEY reaches each worker through a pipe it reads once at start-up, never
  through its environment (so not through /proc/<pid>/environ either).
- SIGTERM and SIGINT go to every worker, which drains as a single process does; the supervisor exits 0 once
  all have stopped cleanly, and kills any still running after their drain and grace (exit 1).
- A worker that dies is restarted after a back-off (0.25 s, doubling to 30 s; reset once a worker has served
  for a minute), logged with a running count; one that fails MAX_START_FAILURES times in a row before serving
  stops the server. A worker whose supervisor is gone (its report pipe breaks) stops itself.
- Key changes made through one worker reach the others as they reach other replicas: from the store itself
  within CRYPTO_INVALIDATION_INTERVAL (service/change_poller.py), at once through Redis when configured.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from grpc_health.v1 import health, health_pb2

from crypto_server.app import HEALTH_SERVICES, CryptoServer, serve_health
from crypto_server.config import ConfigError, Settings

log = logging.getLogger("crypto_server.supervisor")

# Set by the supervisor in each worker's environment.
REPORT_FD = "CRYPTO_SUPERVISOR_FD"  # the pipe a worker reports on
ROOT_KEY_FD = "CRYPTO_ROOT_KEY_FD"  # the pipe a worker reads CRYPTO_ROOT_KEY from, once
WORKER_INDEX = "CRYPTO_WORKER_INDEX"

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
EXIT_OK, EXIT_UNEXPECTED, EXIT_CONFIG = 0, 1, 2
MAX_START_FAILURES = 5
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 30.0
# A worker that served this long before it died starts again from the first back-off.
STABLE_S = 60.0
# Beyond the drain and the grace: how long a worker may take to let go of its store, audit trail and HSM.
_STOP_MARGIN_S = 10.0
# How often the supervisor looks at its workers when nothing else wakes it.
_TICK_S = 0.1


# Check's context is only used to answer NOT_FOUND, for a service name that was never set.
_NO_CONTEXT = cast("grpc.ServicerContext", None)


# -- the worker's side ----------------------------------------------------------------------------------------


def worker_environment() -> dict[str, str] | None:
    """In a worker: the environment its settings come from, the root key read from the supervisor's pipe.
    None in a process the supervisor did not start."""
    if REPORT_FD not in os.environ:
        return None
    env = dict(os.environ)
    key_fd = os.environ.pop(ROOT_KEY_FD, "")
    env.pop(ROOT_KEY_FD, None)
    if key_fd:
        with os.fdopen(int(key_fd), "rb") as pipe:
            env["CRYPTO_ROOT_KEY"] = pipe.read().decode()
    return env


class WorkerLink:
    """A worker's line to its supervisor: one report when it serves, then its health every interval."""

    def __init__(self, fd: int, index: int) -> None:
        self.index = index
        self._fd = fd
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def from_env(cls) -> WorkerLink | None:
        raw = os.environ.get(REPORT_FD, "")
        if not raw:
            return None
        return cls(int(raw), int(os.environ.get(WORKER_INDEX, "0")))

    def _send(self, report: Mapping[str, object]) -> None:
        # One short line per write (< PIPE_BUF): it arrives whole.
        os.write(self._fd, json.dumps(report).encode() + b"\n")

    def serving(self, running: CryptoServer, *, interval_s: float, on_orphaned: Callable[[], None]) -> None:
        """Tell the supervisor this worker serves, then report its health every `interval_s` from a thread;
        `on_orphaned` runs once the supervisor is gone (the pipe broke)."""
        self._send({"serving": True, "pid": os.getpid(), "port": running.port, "metrics_port": running.metrics_port})

        def report_health() -> None:
            while True:
                # The health servicer's own answer, as a probe of this worker would get it. Every name in
                # HEALTH_SERVICES is set before the server starts, so Check never needs its context.
                statuses = {
                    name: running.health.Check(health_pb2.HealthCheckRequest(service=name), _NO_CONTEXT).status
                    for name in HEALTH_SERVICES
                }
                try:
                    self._send({"health": statuses})
                except OSError:
                    on_orphaned()
                    return
                if self._stopping.wait(interval_s):
                    return

        self._thread = threading.Thread(target=report_health, name="supervisor-link", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.close(self._fd)


# -- the supervisor's side ------------------------------------------------------------------------------------


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes]
    reports: int  # the read end of its report pipe
    started: float
    serving_since: float | None = None
    metrics_port: int | None = None
    health: dict[str, int] = field(default_factory=dict)
    heard: float = 0.0
    pending: bytes = b""


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound to host:port with SO_REUSEPORT, never listening: it fixes the port (port 0: a free one)
    that the workers then bind too, and holds it while any worker restarts."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
    reserved = socket.socket(family, kind, proto)
    try:
        reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        reserved.bind(address)
    except OSError:
        reserved.close()
        raise
    return reserved


class Supervisor:
    """Runs `settings.processes` workers (`python -m <worker_module>`) until SIGTERM/SIGINT; see the module
    docstring. `announce` logs the serving line once every worker serves."""

    def __init__(
        self,
        settings: Settings,
        *,
        worker_module: str,
        announce: Callable[[Mapping[str, object]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._worker_module = worker_module
        self._announce = announce
        self._clock = clock
        self._workers: dict[int, _Worker] = {}
        self._restart_at: dict[int, float] = {}
        self._failures = [0] * settings.processes
        self._start_failures = [0] * settings.processes
        self.restarts = 0
        self._port = 0
        self._selector = selectors.DefaultSelector()
        self._signals: list[str] = []
        self._serving = False
        self._stop_deadline: float | None = None
        self._exit_code = EXIT_OK
        self._health = health.HealthServicer()
        self._published: dict[str, int] = {}
        self._health_port: int | None = None

    # Start-up and the main loop.

    def run(self) -> int:
        settings = self._settings
        try:
            reserved = reserve_port(settings.host, settings.port)
        except OSError as error:
            log.error(
                f"cannot start: cannot listen on {settings.host}:{settings.port}: {error.strerror}",
                extra={"exit_code": EXIT_CONFIG},
            )
            return EXIT_CONFIG
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_read, False)
        os.set_blocking(wake_write, False)
        self._selector.register(wake_read, selectors.EVENT_READ)
        previous_wakeup = signal.set_wakeup_fd(wake_write)
        previous_handlers = {
            signum: signal.signal(signum, self._request_stop) for signum in (signal.SIGTERM, signal.SIGINT)
        }
        health_server = None
        try:
            with reserved:
                self._port = reserved.getsockname()[1]
                for name in HEALTH_SERVICES:
                    self._health.set(name, NOT_SERVING)
                self._published = dict.fromkeys(HEALTH_SERVICES, NOT_SERVING)
                if settings.health_port is not None:
                    try:
                        health_server, self._health_port = serve_health(settings, self._health)
                    except ConfigError as error:
                        log.error(f"cannot start: {error}", extra={"exit_code": EXIT_CONFIG})
                        return EXIT_CONFIG
                self._start(0)
                while self._workers or self._stop_deadline is None:
                    self._step(wake_read)
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for signum, handler in previous_handlers.items():
                signal.signal(signum, handler)
            self._selector.close()
            os.close(wake_read)
            os.close(wake_write)
            if health_server is not None:
                health_server.stop(0).wait()
        log.info("stopped", extra={"exit_code": self._exit_code, "restarts": self.restarts})
        return self._exit_code

    def _request_stop(self, signum: int, _frame: object) -> None:
        # Only a flag: logging from a signal handler can deadlock on the handler's lock.
        self._signals.append(signal.Signals(signum).name)

    def _step(self, wake_read: int) -> None:
        for key, _ in self._selector.select(timeout=_TICK_S):
            if key.fd == wake_read:
                with contextlib.suppress(BlockingIOError):
                    while os.read(wake_read, 512):
                        pass
            else:
                self._read_reports(key.data)
        now = self._clock()
        if self._signals and self._stop_deadline is None:
            log.info("stopping", extra={"signal": self._signals[0], "processes": len(self._workers)})
            self._begin_stop(EXIT_OK)
        for worker in list(self._workers.values()):
            code = worker.process.poll()
            if code is not None:
                self._exited(worker, code, now)
        if self._stop_deadline is not None:
            if now > self._stop_deadline:
                for worker in self._workers.values():
                    log.error("worker did not stop in time; killing it", extra={"worker": worker.index})
                    worker.process.kill()
                self._exit_code = EXIT_UNEXPECTED
                self._stop_deadline = now + _STOP_MARGIN_S  # wait for the kills to land
            return
        for index, due in list(self._restart_at.items()):
            if now >= due:
                del self._restart_at[index]
                self._start(index)
        if not self._serving:
            self._continue_start_up()
        self._publish_health(now)

    def _continue_start_up(self) -> None:
        first = self._workers.get(0)
        if first is None or first.serving_since is None:
            return
        if len(self._workers) + len(self._restart_at) < self._settings.processes:
            for index in range(1, self._settings.processes):
                if index not in self._workers and index not in self._restart_at:
                    self._start(index)
            return
        workers = [self._workers.get(index) for index in range(self._settings.processes)]
        if all(worker is not None and worker.serving_since is not None for worker in workers):
            self._serving = True
            self._announce(
                {
                    "port": self._port,
                    "processes": self._settings.processes,
                    "worker_pids": [worker.process.pid for worker in workers if worker is not None],
                    "metrics_port": None,
                    "worker_metrics_ports": [worker.metrics_port for worker in workers if worker is not None],
                    "health_port": self._health_port,
                }
            )

    # Workers.

    def _start(self, index: int) -> None:
        settings = self._settings
        report_read, report_write = os.pipe()
        os.set_blocking(report_read, False)
        env = {name: value for name, value in os.environ.items() if name not in {"CRYPTO_HEALTH_PORT", ROOT_KEY_FD}}
        env.update(
            {
                "CRYPTO_PROCESSES": "1",
                "CRYPTO_PORT": str(self._port),
                "CRYPTO_REUSE_PORT": "1",
                REPORT_FD: str(report_write),
                WORKER_INDEX: str(index),
            }
        )
        if settings.metrics_port:  # a fixed port: worker i serves on it + i (0: each takes a free one)
            env["CRYPTO_METRICS_PORT"] = str(settings.metrics_port + index)
        passed = [report_write]
        if settings.root_key:
            key_read, key_write = os.pipe()
            # 44 bytes: far below the pipe's buffer, so this never blocks.
            os.write(key_write, settings.root_key.encode())
            os.close(key_write)
            env[ROOT_KEY_FD] = str(key_read)
            passed.append(key_read)
        try:
            # The same interpreter and a module named by the code, never by input.
            process = subprocess.Popen([sys.executable, "-m", self._worker_module], env=env, pass_fds=passed)  # noqa: S603
        finally:
            for fd in passed:
                os.close(fd)
        worker = _Worker(index, process, report_read, started=self._clock())
        self._selector.register(report_read, selectors.EVENT_READ, worker)
        self._workers[index] = worker

    def _read_reports(self, worker: _Worker) -> None:
        chunks = []
        try:
            while chunk := os.read(worker.reports, 65536):
                chunks.append(chunk)
            closed = True  # end of file: the worker has gone
        except BlockingIOError:
            closed = False
        lines = (worker.pending + b"".join(chunks)).split(b"\n")
        worker.pending = lines.pop()
        for line in lines:
            try:
                report: dict[str, Any] = json.loads(line)
            except ValueError:
                continue
            worker.heard = self._clock()
            if report.get("serving"):
                worker.serving_since = worker.heard
                worker.metrics_port = report.get("metrics_port")
                self._start_failures[worker.index] = 0
            if isinstance(report.get("health"), dict):
                worker.health = report["health"]
        if closed:
            self._selector.unregister(worker.reports)
            os.close(worker.reports)
            worker.reports = -1

    def _exited(self, worker: _Worker, code: int, now: float) -> None:
        del self._workers[worker.index]
        if worker.reports >= 0:
            self._selector.unregister(worker.reports)
            os.close(worker.reports)
        described: dict[str, object] = {"worker": worker.index, "pid": worker.process.pid}
        if code < 0:
            described["signal"] = signal.Signals(-code).name
        else:
            described["exit_code"] = code
        if self._stop_deadline is not None:
            if code != 0:
                log.warning("worker stopped with an error", extra=described)
                self._exit_code = self._exit_code or EXIT_UNEXPECTED
            return
        if worker.serving_since is None:
            self._start_failures[worker.index] += 1
            # A worker's own start-up error (configuration: 2, store unreachable: 3) is the server's.
            failed_with = code if code > 0 else EXIT_UNEXPECTED
            if not self._serving or self._start_failures[worker.index] >= MAX_START_FAILURES:
                log.error(
                    "cannot start: a worker failed before serving; stopping the others",
                    extra={**described, "failures": self._start_failures[worker.index], "exit_code": failed_with},
                )
                self._begin_stop(failed_with)
                return
        elif now - worker.serving_since >= STABLE_S:
            self._failures[worker.index] = 0
        self._failures[worker.index] += 1
        delay = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** (self._failures[worker.index] - 1))
        self.restarts += 1
        self._restart_at[worker.index] = now + delay
        log.warning(
            "worker exited unexpectedly; restarting it",
            extra={**described, "restart_in_s": delay, "restarts": self.restarts},
        )

    def _begin_stop(self, exit_code: int) -> None:
        settings = self._settings
        self._exit_code = exit_code
        self._restart_at.clear()
        self._health.enter_graceful_shutdown()
        for worker in self._workers.values():
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        self._stop_deadline = self._clock() + settings.shutdown_drain_s + settings.shutdown_grace_s + _STOP_MARGIN_S

    # Health.

    def _publish_health(self, now: float) -> None:
        """SERVING for a service only while every worker serves it and has reported recently."""
        stale_before = now - (3 * self._settings.health_interval_s + 1.0)
        for name in HEALTH_SERVICES:
            up = self._serving and all(
                (worker := self._workers.get(index)) is not None
                and worker.serving_since is not None
                and worker.heard >= stale_before
                and worker.health.get(name) == SERVING
                for index in range(self._settings.processes)
            )
            status = SERVING if up else NOT_SERVING
            if self._published.get(name) != status:
                self._published[name] = status
                self._health.set(name, status)
                if self._serving:
                    log.info(
                        "workers' health",
                        extra={"service": name or "(server)", "health": "SERVING" if up else "NOT_SERVING"},
                    )


def supervise(settings: Settings, *, worker_module: str, announce: Callable[[Mapping[str, object]], None]) -> int:
    """Run `settings.processes` workers until SIGTERM/SIGINT; the exit code."""
    return Supervisor(settings, worker_module=worker_module, announce=announce).run()
