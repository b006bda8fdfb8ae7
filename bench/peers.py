"""`python -m bench.peers [--quick] [--out PATH]`: Encrypt, Decrypt and GenerateDataKey, ours vs a peer's, one run.

The peer is moto's AWS KMS emulation (`moto_server`, PyPI `moto[server]`, the `bench` extra) in its own process on
127.0.0.1, driven by boto3; ours is the crypto server on the embedded store, driven by CryptoClient. Both go through
one closed-loop harness: N threads, one client per thread (each with its own connection), each sending its next
call as soon as the last one answered, for a fixed time. The runs are interleaved (each repetition measures every
operation and thread count on both servers, alternating which goes first), so drift hits both alike; every figure
is the median of the repetitions, with min and max. docs/performance.md ("Peers") says what moto does and does not
stand for.

make bench-peers        -> bench/results/peers.json
make bench-peers-quick  -> shorter runs (about a minute), bench/results/peers-quick.json

`CRYPTO_PROCESSES` (and any other CRYPTO_* setting) in the environment reaches our server unchanged; the JSON
records its value and how many server processes were seen while measuring.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from bench.processes import cpu_seconds_of_tree, process_tree
from bench.reporting import run_and_report
from bench.scenarios import KIB, TENANT, Backends, summary, with_scratch
from crypto_client import ClientConfig, CryptoClient, CryptoClientError, KeyType
from tests.servers import CryptoServerProcess, free_port

if TYPE_CHECKING:
    from types_boto3_kms.client import KMSClient

OPERATIONS = ("encrypt", "decrypt", "generate_data_key")
PEERS = ("moto", "ours")
# Thread counts of issue 17's table; the target (>= 15 x moto's Encrypt rate at <= 1/5 of its p50) is checked at each.
TARGET_RPS_RATIO = 15.0
TARGET_P50_RATIO = 1 / 5


@dataclass(frozen=True)
class PeerPhases:
    """How long each measurement runs; `--quick` uses shorter runs."""

    repetitions: int
    seconds: float  # per run: one operation, one thread count, one server
    threads: tuple[int, ...]


FULL = PeerPhases(3, 8.0, (1, 8))
QUICK = PeerPhases(3, 1.5, (1, 8))


@dataclass(frozen=True)
class Sample:
    """One closed-loop run."""

    rps: float
    p50_ms: float
    p99_ms: float
    calls: int
    failed: int
    harness_cpu_cores: float  # this process's CPU time / wall time: the load generator's cost
    server_cpu_cores: float  # the server's processes (and their children): CPU time / wall time


Call = Callable[[], object]


def _harness_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def closed_loop(calls: list[Call], seconds: float, *, failures: tuple[type[Exception], ...], server_pid: int) -> Sample:
    """Run each of `calls` in its own thread, back to back, for `seconds`; every call's latency is kept.

    A call that raises one of `failures` counts as failed (and its latency is kept); anything else is a bug in the
    benchmark and stops the run. The rate counts every call over the time until the last thread is done.
    """
    start = threading.Barrier(len(calls) + 1)
    latencies: list[list[float]] = [[] for _ in calls]
    failed = [0] * len(calls)
    errors: list[BaseException] = []
    deadline = 0.0

    def worker(index: int) -> None:
        call, measured = calls[index], latencies[index]
        start.wait()
        try:
            while True:  # at least one call per thread, however late it is scheduled
                began = time.perf_counter()
                try:
                    call()
                except failures:
                    failed[index] += 1
                ended = time.perf_counter()
                measured.append(ended - began)
                if ended >= deadline:
                    return
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,), name=f"peers-load-{i}") for i in range(len(calls))]
    for thread in threads:
        thread.start()
    server_cpu = cpu_seconds_of_tree(server_pid)
    harness_cpu = _harness_cpu_seconds()
    began = time.perf_counter()
    deadline = began + seconds
    start.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    harness_cpu = _harness_cpu_seconds() - harness_cpu
    server_cpu = cpu_seconds_of_tree(server_pid) - server_cpu
    if errors:
        raise RuntimeError("the load generator failed") from errors[0]
    every = sorted(latency for measured in latencies for latency in measured)
    quantiles = statistics.quantiles(every, n=100, method="inclusive")
    return Sample(
        rps=len(every) / elapsed,
        p50_ms=quantiles[49] * 1000,
        p99_ms=quantiles[98] * 1000,
        calls=len(every),
        failed=sum(failed),
        harness_cpu_cores=harness_cpu / elapsed,
        server_cpu_cores=server_cpu / elapsed,
    )


# -- the peer: moto's AWS KMS emulation ------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A server under test: its clients (one per thread) and each operation's call, bound to one client."""

    name: str
    pid: int
    operations: dict[str, list[Call]]  # operation -> one call per client
    failures: tuple[type[Exception], ...]


@contextlib.contextmanager
def moto_server(log_path: Path) -> Iterator[tuple[str, int]]:
    """`moto_server` on 127.0.0.1 and a free port, its request log in `log_path`: (endpoint URL, pid)."""
    port = free_port()
    command = [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    with log_path.open("ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"moto_server exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not listen within 30 s; see {log_path}")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _kms_client(endpoint: str) -> KMSClient:
    # A session per client: boto3 sessions are not thread-safe. moto checks no signature, so any credentials do.
    # One attempt, so a failure is counted instead of hidden by a retry; one connection, as each of our clients has.
    return boto3.session.Session().client(
        "kms",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=botocore.config.Config(retries={"total_max_attempts": 1}, max_pool_connections=1),
    )


def moto_target(endpoint: str, pid: int, clients: int) -> Target:
    """A symmetric key created once; Encrypt and Decrypt of 1 KiB, GenerateDataKey of AES_256, per client."""
    kms = [_kms_client(endpoint) for _ in range(clients)]
    key_id = kms[0].create_key(KeySpec="SYMMETRIC_DEFAULT", KeyUsage="ENCRYPT_DECRYPT")["KeyMetadata"]["KeyId"]
    plaintext = os.urandom(KIB)
    sealed = kms[0].encrypt(KeyId=key_id, Plaintext=plaintext)["CiphertextBlob"]
    for client in kms:  # connects each client, and checks the calls answer as they should
        assert client.decrypt(CiphertextBlob=sealed)["Plaintext"] == plaintext
        assert len(client.generate_data_key(KeyId=key_id, KeySpec="AES_256")["Plaintext"]) == 32

    def encrypt(client: KMSClient) -> Call:
        return lambda: client.encrypt(KeyId=key_id, Plaintext=plaintext)

    def decrypt(client: KMSClient) -> Call:
        return lambda: client.decrypt(CiphertextBlob=sealed)

    def generate_data_key(client: KMSClient) -> Call:
        return lambda: client.generate_data_key(KeyId=key_id, KeySpec="AES_256")

    return Target(
        name="moto",
        pid=pid,
        operations={
            "encrypt": [encrypt(c) for c in kms],
            "decrypt": [decrypt(c) for c in kms],
            "generate_data_key": [generate_data_key(c) for c in kms],
        },
        failures=(botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError),
    )


# -- ours: the crypto server through CryptoClient ------------------------------------------------------------------


@contextlib.contextmanager
def our_server(backends: Backends) -> Iterator[CryptoServerProcess]:
    """The server as bench/scenarios.py's bench_server starts it (embedded store, the echo baseline registered),
    without keeping its one-line-per-call access log in this process's memory. CRYPTO_* variables in the environment
    pass through; with CRYPTO_PROCESSES the port is chosen here, since workers sharing it cannot each pick port 0."""
    env = backends.env("embedded", "peers")
    if os.environ.get("CRYPTO_PROCESSES"):
        env["CRYPTO_PORT"] = str(free_port())
    server = CryptoServerProcess.launch(env, module="bench.echo_server", keep_rpc_lines=False)
    try:
        yield server
    finally:
        server.terminate()


def our_target(server: CryptoServerProcess, clients: int, stack: contextlib.ExitStack) -> Target:
    """A DATA key created once; Encrypt and Decrypt of 1 KiB and GenerateDataKey (256-bit), per client. Each client
    has its own connection (a local subchannel pool), as each boto3 client has: with several server processes
    sharing the port, the kernel spreads connections, not calls."""
    config = ClientConfig(channel_options=[("grpc.use_local_subchannel_pool", 1)])
    ours = [stack.enter_context(CryptoClient(server.address, TENANT, config)) for _ in range(clients)]
    key_id = ours[0].create_key(KeyType.DATA).key_id
    plaintext = os.urandom(KIB)
    sealed = ours[0].encrypt(key_id, plaintext).ciphertext
    for client in ours:
        assert client.decrypt(sealed).plaintext == plaintext
        data_key = client.generate_data_key(key_id).plaintext
        assert data_key is not None and len(data_key) == 32

    def encrypt(client: CryptoClient) -> Call:
        return lambda: client.encrypt(key_id, plaintext)

    def decrypt(client: CryptoClient) -> Call:
        return lambda: client.decrypt(sealed)

    def generate_data_key(client: CryptoClient) -> Call:
        return lambda: client.generate_data_key(key_id)

    return Target(
        name="ours",
        pid=server.process.pid,
        operations={
            "encrypt": [encrypt(c) for c in ours],
            "decrypt": [decrypt(c) for c in ours],
            "generate_data_key": [generate_data_key(c) for c in ours],
        },
        failures=(CryptoClientError,),
    )


# -- the run ----------------------------------------------------------------------------------------------------


def _settings(phases: PeerPhases, server: CryptoServerProcess, env: dict[str, str]) -> dict[str, Any]:
    return {
        "phases": asdict(phases),
        "payload_bytes": KIB,
        "harness": "closed loop, one thread per client, one client (and connection) per thread, fixed time per run",
        "ours": {
            "CRYPTO_PROCESSES": os.environ.get("CRYPTO_PROCESSES"),
            "server_processes_seen": len(process_tree(server.process.pid)),
            "CRYPTO_WORKERS": env.get("CRYPTO_WORKERS"),
            "store": "embedded",
            "client": "crypto_client.CryptoClient (blocking), default retries and breaker",
            "key": "KeyType.DATA (AES-256-GCM), created once",
            # Names only: a value could be key material (CRYPTO_ROOT_KEY).
            "crypto_variables_from_environment": sorted(k for k in os.environ if k.startswith("CRYPTO_")),
        },
        "moto": {
            "command": "moto_server -H 127.0.0.1 -p <free port>",
            "key": "SYMMETRIC_DEFAULT, ENCRYPT_DECRYPT, created once",
            "generate_data_key": "KeySpec AES_256",
            "client": "boto3 KMS client, one session each, total_max_attempts 1, max_pool_connections 1",
        },
    }


def _machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": version("grpcio"),
        "cryptography": version("cryptography"),
        "moto": version("moto"),
        "boto3": version("boto3"),
        "botocore": version("botocore"),
        "werkzeug": version("werkzeug"),
    }


def _figures(samples: list[Sample]) -> dict[str, Any]:
    return {
        "rps": summary([s.rps for s in samples]),
        "p50_ms": summary([s.p50_ms for s in samples]),
        "p99_ms": summary([s.p99_ms for s in samples]),
        "harness_cpu_cores": summary([s.harness_cpu_cores for s in samples]),
        "server_cpu_cores": summary([s.server_cpu_cores for s in samples]),
        # CPU per call shifts less than rates when other work shares the machine.
        "harness_cpu_ms_per_call": summary([1000 * s.harness_cpu_cores / s.rps for s in samples]),
        "server_cpu_ms_per_call": summary([1000 * s.server_cpu_cores / s.rps for s in samples]),
        "calls": [s.calls for s in samples],
    }


def measure(targets: dict[str, Target], phases: PeerPhases, log: Callable[[str], None]) -> dict[str, Any]:
    """Every operation at every thread count on every target, `phases.repetitions` times, interleaved."""
    samples: dict[tuple[str, str, int], list[Sample]] = {}
    for repetition in range(phases.repetitions):
        order = list(targets) if repetition % 2 == 0 else list(reversed(targets))  # neither always goes first
        log(f"repetition {repetition + 1}/{phases.repetitions}")
        for threads in phases.threads:
            for operation in OPERATIONS:
                for name in order:
                    target = targets[name]
                    sample = closed_loop(
                        target.operations[operation][:threads],
                        phases.seconds,
                        failures=target.failures,
                        server_pid=target.pid,
                    )
                    if sample.failed:
                        raise RuntimeError(f"{name} {operation} at {threads} threads: {sample.failed} calls failed")
                    samples.setdefault((name, operation, threads), []).append(sample)
    results: dict[str, Any] = {name: {} for name in targets}
    for (name, operation, threads), measured in samples.items():
        results[name].setdefault(operation, {})[str(threads)] = _figures(measured)
    return results


def ratios(measured: dict[str, Any], phases: PeerPhases, cores: int) -> dict[str, Any]:
    """Ours / moto's, of the medians: rps (higher is better for us), p50 and server CPU per call (lower is).

    And the ceiling of this machine: the client and the server share its `cores`, so our calls cannot go faster
    than `cores` ÷ (the harness's CPU per call + the server's), however many server processes run; its ratio to
    moto's rate is the most this harness could show here."""
    out: dict[str, Any] = {}
    for operation in OPERATIONS:
        for threads in map(str, phases.threads):
            ours, theirs = measured["ours"][operation][threads], measured["moto"][operation][threads]
            cpu_ms_per_call = ours["harness_cpu_ms_per_call"]["median"] + ours["server_cpu_ms_per_call"]["median"]
            ceiling_rps = cores * 1000 / cpu_ms_per_call
            out.setdefault(operation, {})[threads] = {
                "rps_ratio": ours["rps"]["median"] / theirs["rps"]["median"],
                "p50_ratio": ours["p50_ms"]["median"] / theirs["p50_ms"]["median"],
                "server_cpu_per_call_ratio": ours["server_cpu_ms_per_call"]["median"]
                / theirs["server_cpu_ms_per_call"]["median"],
                "machine_ceiling_rps": ceiling_rps,
                "machine_ceiling_rps_ratio": ceiling_rps / theirs["rps"]["median"],
            }
    return out


def targets_met(ratio: dict[str, Any], phases: PeerPhases) -> list[dict[str, Any]]:
    checked = []
    processes = os.environ.get("CRYPTO_PROCESSES")
    for threads in map(str, phases.threads):
        encrypt = ratio["encrypt"][threads]
        checked.append(
            {
                "target": f"Encrypt through CryptoClient @{threads} threads: >= {TARGET_RPS_RATIO:g} x moto's rps "
                f"at <= 1/{1 / TARGET_P50_RATIO:g} of its p50",
                "rps_ratio": encrypt["rps_ratio"],
                "p50_ratio": encrypt["p50_ratio"],
                "met": encrypt["rps_ratio"] >= TARGET_RPS_RATIO and encrypt["p50_ratio"] <= TARGET_P50_RATIO,
                # Whether this machine could show it at all (client and server on the same cores).
                "machine_ceiling_rps_ratio": encrypt["machine_ceiling_rps_ratio"],
                "reachable_on_this_machine": encrypt["machine_ceiling_rps_ratio"] >= TARGET_RPS_RATIO,
                "CRYPTO_PROCESSES": processes,
                "as_the_target_states": processes == "auto",
            }
        )
    return checked


def run(phases: PeerPhases, log: Callable[[str], None]) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": _machine(), "started": time.time()}
    max_threads = max(phases.threads)
    with with_scratch() as scratch, contextlib.ExitStack() as stack:
        backends = Backends(Path(scratch))
        log("starting moto_server and our server")
        endpoint, moto_pid = stack.enter_context(moto_server(Path(scratch) / "moto.log"))
        server = stack.enter_context(our_server(backends))
        targets = {
            "moto": moto_target(endpoint, moto_pid, max_threads),
            "ours": our_target(server, max_threads, stack),
        }
        results["settings"] = _settings(phases, server, backends.env("embedded", "peers"))
        results.update(measure(targets, phases, log))
    results["ratios"] = ratios(results, phases, os.cpu_count() or 1)
    results["targets"] = targets_met(results["ratios"], phases)
    results["finished"] = time.time()
    return results


def table(results: dict[str, Any]) -> str:
    header = (
        f"{'operation':<18} {'thr':>3} {'moto rps':>9} {'ours rps':>9} {'ratio':>7} "
        f"{'moto p50':>9} {'ours p50':>9} {'ratio':>7} {'harness cores m/o':>17} {'server cpu ms/call m/o':>22}"
    )
    lines = [header]
    for operation in OPERATIONS:
        for threads, ratio in results["ratios"][operation].items():
            moto, ours = results["moto"][operation][threads], results["ours"][operation][threads]
            lines.append(
                f"{operation:<18} {threads:>3} {moto['rps']['median']:>9.0f} {ours['rps']['median']:>9.0f} "
                f"{ratio['rps_ratio']:>7.2f} {moto['p50_ms']['median']:>7.2f}ms {ours['p50_ms']['median']:>7.2f}ms "
                f"{ratio['p50_ratio']:>7.3f} "
                f"{moto['harness_cpu_cores']['median']:>8.2f}/{ours['harness_cpu_cores']['median']:<8.2f} "
                f"{moto['server_cpu_ms_per_call']['median']:>11.2f}/{ours['server_cpu_ms_per_call']['median']:<10.2f}"
            )
    lines.append("")
    for target in results["targets"]:
        setting = target["CRYPTO_PROCESSES"] or "unset"
        lines.append(
            f"{target['target']}: rps x{target['rps_ratio']:.2f}, p50 x{target['p50_ratio']:.3f} -> "
            f"met={target['met']} (CRYPTO_PROCESSES={setting}); this machine's ceiling: "
            f"x{target['machine_ceiling_rps_ratio']:.2f} (reachable here: {target['reachable_on_this_machine']})"
        )
    lines.append(
        "harness cores: the load generator's CPU seconds / wall seconds (it must stay below 1: one Python process); "
        "server cpu: the server's CPU per call; m/o = moto/ours; ceiling: cores / (harness + server CPU per call), "
        "as a multiple of moto's rate"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter runs (about a minute)")
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    args = parser.parse_args()
    phases = QUICK if args.quick else FULL
    out = args.out or Path("bench/results") / ("peers-quick.json" if args.quick else "peers.json")
    return run_and_report(run, table, phases, out)


if __name__ == "__main__":
    raise SystemExit(main())
