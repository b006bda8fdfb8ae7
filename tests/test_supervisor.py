"""CRYPTO_PROCESSES=N: a supervisor and N worker processes on one port (crypto_server/supervisor.py).

Real processes on 127.0.0.1, port 0. A channel is pinned to one worker (its own TCP connection); which worker
answers it is read from the workers' own /metrics ports, so a test can call a chosen worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import grpc
import pytest

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc, key_service_pb2_grpc, resources_pb2
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.config import ConfigError, Settings, available_cpus
from tests.conftest import Launch
from tests.servers import CryptoServerProcess, MongoServer, RedisServer
from tests.waiting import eventually

TENANT = "acme"
# Short enough that a test waits little for a change to cross processes; the keyring TTL (300 s) is far longer,
# so nothing but the change poller (or Redis) can make another worker see a change in time.
INVALIDATION_INTERVAL_S = 0.2
HEALTH_INTERVAL_S = 0.2
# The bound a test waits for something that must happen within about one interval, on a busy shared machine.
EVENTUALLY_S = 10.0


def _launch_two(launch: Launch, **env: str) -> CryptoServerProcess:
    return launch(
        CRYPTO_PROCESSES="2",
        CRYPTO_METRICS_PORT="0",
        CRYPTO_HEALTH_INTERVAL=str(HEALTH_INTERVAL_S),
        CRYPTO_INVALIDATION_INTERVAL=str(INVALIDATION_INTERVAL_S),
        GRPC_VERBOSITY="NONE",
        **env,
    )


def _eventually(condition: Callable[[], object], what: str, timeout_s: float = EVENTUALLY_S) -> None:
    eventually(condition, timeout_s=timeout_s, what=what)


def _rpcs_served(metrics_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("caas_crypto_rpc_total{"))


def _own_connection(address: str) -> grpc.Channel:
    # A local subchannel pool: this channel gets a TCP connection of its own (grpc shares one per target otherwise).
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


class Workers:
    """The supervised server's workers, with channels sorted by the worker that answers them."""

    def __init__(self, server: CryptoServerProcess) -> None:
        self.server = server
        serving = server.wait_for_log("serving")
        self.pids = [int(str(pid)) for pid in serving["worker_pids"]]  # type: ignore[attr-defined]
        self.metrics_ports = [int(str(port)) for port in serving["worker_metrics_ports"]]  # type: ignore[attr-defined]
        self.channels: dict[int, list[grpc.Channel]] = {index: [] for index in range(len(self.pids))}
        self._opened: list[grpc.Channel] = []

    def worker_of(self, channel: grpc.Channel) -> int:
        """Which worker answers `channel`: the one whose RPC count one call raises."""
        before = [_rpcs_served(port) for port in self.metrics_ports]
        key_service_pb2_grpc.KeyServiceStub(channel).ListKeys(key_pb.ListKeysRequest(tenant_id=TENANT), timeout=10)
        raised: list[int] = []

        def one_raised() -> bool:
            raised[:] = [i for i, port in enumerate(self.metrics_ports) if _rpcs_served(port) > before[i]]
            return len(raised) == 1

        _eventually(one_raised, "one worker counts the call")
        return raised[0]

    def open_channels(self, count: int) -> None:
        for _ in range(count):
            channel = _own_connection(self.server.address)
            self._opened.append(channel)
            self.channels[self.worker_of(channel)].append(channel)

    def channel_to(self, index: int) -> grpc.Channel:
        assert self.channels[index], f"none of {len(self._opened)} new connections reached worker {index}"
        return self.channels[index][0]

    def close(self) -> None:
        for channel in self._opened:
            channel.close()


@pytest.fixture
def two_workers(launch: Launch) -> Iterator[Workers]:
    workers = Workers(_launch_two(launch))
    yield workers
    workers.close()


def _create_key(channel: grpc.Channel) -> str:
    keys = key_service_pb2_grpc.KeyServiceStub(channel)
    request = key_pb.CreateKeyRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_DATA)
    return str(keys.CreateKey(request, timeout=10).key.key_id)


def _encrypt(channel: grpc.Channel, key_id: str) -> crypto_pb.EncryptResponse:
    crypto = crypto_service_pb2_grpc.CryptoServiceStub(channel)
    return crypto.Encrypt(crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=key_id, plaintext=b"x"), timeout=10)


def test_the_serving_line_comes_once_every_worker_serves_with_the_real_port(two_workers: Workers) -> None:
    serving = two_workers.server.wait_for_log("serving")
    assert serving["processes"] == 2 and serving["port"] == two_workers.server.port != 0
    assert len(set(two_workers.pids)) == 2 and two_workers.server.process.pid not in two_workers.pids
    workers_serving = [e for e in two_workers.server.logs() if e.get("msg") == "worker serving"]
    assert sorted(int(str(e["worker"])) for e in workers_serving) == [0, 1]
    assert all(e["port"] == serving["port"] for e in workers_serving)
    assert [e.get("msg") for e in two_workers.server.logs()].count("serving") == 1


def test_new_connections_are_spread_over_both_workers(two_workers: Workers) -> None:
    two_workers.open_channels(16)  # all 16 on one of two workers: 1 chance in 2**15
    assert two_workers.channels[0] and two_workers.channels[1]


@pytest.mark.parametrize("backend", ["embedded", "mongo+redis"])
def test_a_rotation_or_disable_through_one_worker_is_seen_by_the_other_within_the_invalidation_interval(
    launch: Launch, request: pytest.FixtureRequest, root_key: str, backend: str
) -> None:
    env: dict[str, str] = {}
    if backend == "mongo+redis":
        mongo: MongoServer = request.getfixturevalue("mongo_server")
        redis_server: RedisServer = request.getfixturevalue("redis_server")
        env = {
            "MONGODB_URI": mongo.uri,
            "MONGODB_DATABASE": f"supervised{os.getpid()}",
            "REDIS_URL": redis_server.url,
            "CRYPTO_ROOT_KEY": root_key,
        }
    workers = Workers(_launch_two(launch, **env))
    try:
        workers.open_channels(12)
        first, second = workers.channel_to(0), workers.channel_to(1)
        key_id = _create_key(first)
        assert _encrypt(first, key_id).key_version == _encrypt(second, key_id).key_version == 1  # both hold it

        keys = key_service_pb2_grpc.KeyServiceStub(first)
        keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key_id), timeout=10)
        _eventually(lambda: _encrypt(second, key_id).key_version == 2, "the other worker encrypts under version 2")

        keys.DisableKey(key_pb.DisableKeyRequest(tenant_id=TENANT, key_id=key_id), timeout=10)

        def refused() -> bool:
            try:
                _encrypt(second, key_id)
            except grpc.RpcError as error:
                assert error.code() is grpc.StatusCode.FAILED_PRECONDITION, error
                return True
            return False

        _eventually(refused, "the other worker refuses the disabled key")
    finally:
        workers.close()
    assert workers.server.terminate() == 0


def test_concurrent_creates_through_both_workers_never_fail(two_workers: Workers) -> None:
    two_workers.open_channels(8)
    channels = [c for index in (0, 1) for c in two_workers.channels[index][:3]]
    assert two_workers.channels[0] and two_workers.channels[1]
    errors: list[BaseException] = []
    created: list[str] = []

    def create_many(channel: grpc.Channel) -> None:
        try:
            for _ in range(25):
                created.append(_create_key(channel))
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=create_many, args=(channel,)) for channel in channels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors[0]
    assert len(set(created)) == 25 * len(channels)
    assert not [line for line in two_workers.server.lines if "database is locked" in line]


def test_a_killed_worker_is_restarted_and_the_port_keeps_answering(launch: Launch) -> None:
    server = _launch_two(launch, CRYPTO_HEALTH_PORT="0")  # the supervisor serves health while it restarts
    pids = [int(str(pid)) for pid in server.wait_for_log("serving")["worker_pids"]]  # type: ignore[attr-defined]
    key_id = _create_key(_own_connection(server.address))
    os.kill(pids[0], signal.SIGKILL)
    restarted = server.wait_for_log("worker exited unexpectedly; restarting it")
    assert restarted["signal"] == "SIGKILL" and restarted["restarts"] == 1 and restarted["worker"] == 0
    for _ in range(8):  # new connections reach the surviving worker meanwhile
        with _own_connection(server.address) as channel:
            assert _encrypt(channel, key_id).key_version == 1

    def health_changes() -> list[object]:
        return [e["health"] for e in server.logs() if e.get("msg") == "workers' health" and e["service"] == "(server)"]

    # The health port: NOT_SERVING while worker 0 was missing, SERVING once it serves again.
    _eventually(lambda: health_changes()[-1:] == ["SERVING"] and "NOT_SERVING" in health_changes(), "SERVING again")
    assert len([e for e in server.logs() if e.get("msg") == "worker serving" and e["worker"] == 0]) == 2
    assert server.terminate() == 0


def test_sigterm_stops_every_worker_and_the_supervisor_exits_0(two_workers: Workers) -> None:
    pids = two_workers.pids
    assert two_workers.server.terminate() == 0
    stopped = [e for e in two_workers.server.logs() if e.get("msg") == "stopped"]
    assert len(stopped) == 3  # each worker's, then the supervisor's
    for pid in pids:  # reaped by the supervisor before it exited
        assert not Path(f"/proc/{pid}").exists()


def test_workers_stop_themselves_when_the_supervisor_is_killed(two_workers: Workers) -> None:
    two_workers.server.kill()
    for pid in two_workers.pids:
        # Not our children: gone, or a zombie waiting for init to reap it.
        _eventually(partial(_gone, pid), f"worker {pid} stops")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_the_health_port_is_serving_only_while_every_worker_is(launch: Launch) -> None:
    server = _launch_two(launch, CRYPTO_HEALTH_PORT="0")
    serving = server.wait_for_log("serving")
    pids = [int(str(pid)) for pid in serving["worker_pids"]]  # type: ignore[attr-defined]

    def healthcheck() -> int:
        env = {**os.environ, "CRYPTO_HEALTH_PORT": str(serving["health_port"])}
        return subprocess.run(
            [sys.executable, "-m", "crypto_server.healthcheck"], env=env, capture_output=True, check=False
        ).returncode

    _eventually(lambda: healthcheck() == 0, "health SERVING")
    os.kill(pids[1], signal.SIGSTOP)  # stuck: it holds its socket but reports nothing
    try:
        _eventually(lambda: healthcheck() == 4, "health NOT_SERVING while a worker is stuck")
    finally:
        os.kill(pids[1], signal.SIGCONT)
    _eventually(lambda: healthcheck() == 0, "health SERVING again")
    assert server.terminate() == 0


def test_the_root_key_reaches_workers_without_their_environment(launch: Launch, root_key: str) -> None:
    server = _launch_two(launch, CRYPTO_ROOT_KEY=root_key)
    serving = server.wait_for_log("serving")
    assert serving["root_key_source"] == "CRYPTO_ROOT_KEY"
    for pid in serving["worker_pids"]:  # type: ignore[attr-defined]
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert root_key.encode() not in environ and b"CRYPTO_ROOT_KEY=" not in environ
    with _own_connection(server.address) as channel:
        _encrypt(channel, _create_key(channel))
    assert server.terminate() == 0


def _run_to_exit(env: dict[str, str]) -> tuple[int, str]:
    process = subprocess.run(
        [sys.executable, "-m", "crypto_server"],
        env={**os.environ, "CRYPTO_HOST": "127.0.0.1", "CRYPTO_PORT": "0", "GRPC_VERBOSITY": "NONE", **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return process.returncode, process.stderr


def test_a_worker_start_up_error_fails_fast_with_its_exit_code(tmp_path: Path) -> None:
    code, stderr = _run_to_exit(
        {"CRYPTO_PROCESSES": "2", "CRYPTO_DATA_DIR": str(tmp_path / "data"), "CRYPTO_ROOT_KEY": "not base64!"}
    )
    assert code == 2, stderr
    assert stderr.count("CRYPTO_ROOT_KEY must be base64 text") == 1  # worker 0 failed; worker 1 never started
    assert "a worker failed before serving" in stderr and "restarting" not in stderr


def test_a_bad_processes_setting_is_a_configuration_error(tmp_path: Path) -> None:
    code, stderr = _run_to_exit({"CRYPTO_PROCESSES": "many", "CRYPTO_DATA_DIR": str(tmp_path / "data")})
    assert code == 2 and "CRYPTO_PROCESSES must be a number of processes or auto" in stderr


@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [("max 100000\n", None), ("50000 100000\n", 1), ("150000 100000\n", 2), ("garbage", None)],
)
def test_auto_is_the_cpus_available_capped_by_the_cgroup_quota(
    tmp_path: Path, cpu_max: str, expected: int | None
) -> None:
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    cpus = len(os.sched_getaffinity(0))
    assert available_cpus(path) == (cpus if expected is None else min(cpus, expected))
    assert available_cpus(tmp_path / "absent") == cpus


def test_auto_resolves_to_a_number_of_processes() -> None:
    assert Settings.from_env({"CRYPTO_PROCESSES": "auto"}).processes >= 1
    assert Settings.from_env({}).processes == 1
    with pytest.raises(ConfigError, match="between 1 and"):
        Settings.from_env({"CRYPTO_PROCESSES": "0"})


def test_both_workers_audit_into_one_file_each_in_a_chain_that_verifies(
    launch: Launch, root_key: str, tmp_path: Path
) -> None:
    workers = Workers(_launch_two(launch, CRYPTO_ROOT_KEY=root_key, CRYPTO_AUDIT_CRYPTO="all"))
    try:
        workers.open_channels(8)
        key_id = _create_key(workers.channel_to(0))
        for index in (0, 1):
            for channel in workers.channels[index]:
                _encrypt(channel, key_id)
    finally:
        workers.close()
    assert workers.server.terminate() == 0
    verify = subprocess.run(
        [sys.executable, "-m", "crypto_server.audit_cli", "verify"],
        env={**os.environ, "CRYPTO_DATA_DIR": str(tmp_path / "data"), "CRYPTO_ROOT_KEY": root_key},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    chains = {json.loads(line)["chain"] for line in (tmp_path / "data" / "audit.jsonl").open()}
    assert len(chains) == 2  # one per worker, interleaved in one file


def test_a_worker_that_keeps_failing_at_start_after_a_crash_stops_the_server(tmp_path: Path) -> None:
    fail_file = tmp_path / "fail"
    first_backoff_s = 0.025  # production's is 0.25 s: its five back-offs would wait 7.75 s
    env = {
        "CRYPTO_PROCESSES": "2",
        "CRYPTO_DATA_DIR": str(tmp_path / "data"),
        "STUB_FAIL_FILE": str(fail_file),
        "STUB_FIRST_BACKOFF_S": str(first_backoff_s),
    }
    server = CryptoServerProcess.launch(env, module="tests.supervised_stub")
    try:
        pids = server.wait_for_log("serving")["worker_pids"]
        fail_file.touch()  # from now on, a worker fails at start-up
        os.kill(pids[0], signal.SIGKILL)  # type: ignore[index]
        assert server.process.wait(timeout=60) == 2
    finally:
        server.kill()
    restarts = [e for e in server.logs() if e.get("msg") == "worker exited unexpectedly; restarting it"]
    # After the crash, then after each of 4 failed starts, a doubling back-off; the 5th failed start ends it.
    assert [e["restart_in_s"] for e in restarts] == [first_backoff_s * 2**n for n in range(5)]
    gave_up = server.wait_for_log("cannot start: a worker failed before serving; stopping the others")
    assert gave_up["failures"] == 5 and gave_up["exit_code"] == 2
