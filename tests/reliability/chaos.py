"""`make chaos`: mixed load on two replicas while a seeded scheduler kills and freezes Redis, MongoDB and a replica.

Everything runs on 127.0.0.1 and stops by itself: the servers are started here (SecantusDB for MongoDB,
redis-server, two `python -m crypto_server` processes on fixed ports), the load is CryptoClient threads with
the client's own retries, and the run lasts `--duration` seconds of faults (default 120, at most 150) plus
start-up, settling and the final checks: under 3 minutes in all.

At the end the invariants of issue 10 are checked and a JSON report is written:

- confirmed keys lost: 0 (every key whose CreateKey answered exists on every replica);
- ciphertexts that no longer decrypt: 0 (every confirmed ciphertext decrypts to its plaintext);
- calls that reached a caller with a non-retriable error caused by a fault: 0 (after the client's retries, a
  caller may see only errors it can retry: UNAVAILABLE / DEADLINE_EXCEEDED);
- versions unique and contiguous (1..n, primary n) for every key;
- a disabled key refused on every replica within the stated bound (CRYPTO_INVALIDATION_INTERVAL + margin),
  counted separately when the database itself was down at the time (the bound needs the store);
- health answered within 100 ms at every sample of a replica that was up (reported; 1 s is asserted).

Run: `make chaos` (or `python -m tests.reliability.chaos --seed 7 --duration 120`).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crypto_client import ClientConfig, CryptoClient, DecryptItem, RetryPolicy
from crypto_client.errors import (
    CryptoClientError,
    DeadlineExceededError,
    KeyDisabledError,
    ServiceUnavailableError,
)
from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc
from tests.servers import CryptoServerProcess, MongoServer, RedisServer, free_port

TENANT = "chaos"
# What a caller may see after the client's retries when a fault hit its call: it retries those itself.
RETRIABLE = (ServiceUnavailableError, DeadlineExceededError)
DISABLE_BOUND_S = 2.0
HEALTH_TARGET_S = 0.1
HEALTH_LIMIT_S = 1.0


@dataclass
class Record:
    """Everything the load confirmed, and everything that went wrong."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: list[str] = field(default_factory=list)
    toggled_keys: list[str] = field(default_factory=list)
    ciphertexts: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    calls: Counter[str] = field(default_factory=Counter)
    retriable: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    health_samples: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    disable_latencies: list[float] = field(default_factory=list)
    disable_late: list[str] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    store_down: list[tuple[float, float]] = field(default_factory=list)

    def count(self, name: str) -> None:
        with self.lock:
            self.calls[name] += 1

    def failed(self, name: str, error: Exception) -> None:
        with self.lock:
            if isinstance(error, RETRIABLE):
                self.retriable[f"{name}:{type(error).__name__}"] += 1
            else:
                self.violations.append(f"{name}: {type(error).__name__}: {error}")


class Deployment:
    """MongoDB, Redis and two replicas on fixed loopback ports."""

    def __init__(self, directory: Path) -> None:
        self.mongo = MongoServer(directory / "mongo")
        self.redis = RedisServer(directory / "redis")
        self.ports = [free_port(), free_port()]
        self.env = {
            "MONGODB_DATABASE": "chaos",
            "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
            "CRYPTO_HEALTH_INTERVAL": "0.5",
            "CRYPTO_SHUTDOWN_GRACE": "5",
        }
        self.replicas: list[CryptoServerProcess | None] = [None, None]
        self.frozen_replica = False

    def start(self) -> None:
        self.mongo.start()
        self.redis.start()
        self.env.update(MONGODB_URI=self.mongo.uri, REDIS_URL=self.redis.url)
        for index in range(2):
            self.start_replica(index)

    def start_replica(self, index: int) -> None:
        self.replicas[index] = CryptoServerProcess.launch(
            {**self.env, "CRYPTO_PORT": str(self.ports[index])}, keep_rpc_lines=False
        )

    def stop(self) -> None:
        for replica in self.replicas:
            if replica is not None:
                replica.kill()
        self.redis.stop()
        self.mongo.stop()

    @property
    def target(self) -> str:
        return "ipv4:" + ",".join(f"127.0.0.1:{port}" for port in self.ports)


def _client(deployment: Deployment) -> CryptoClient:
    config = ClientConfig(
        timeout_s=8.0,
        retry=RetryPolicy(max_attempts=8, initial_backoff_s=0.05, max_backoff_s=1.0),
        channel_options=(("grpc.lb_policy_name", "round_robin"),),
    )
    return CryptoClient(deployment.target, TENANT, config)


def _call(record: Record, name: str, action: Callable[..., Any], *args: Any) -> Any:
    try:
        result = action(*args)
    except CryptoClientError as error:
        record.failed(name, error)
        return None
    record.count(name)
    return result


def _load(deployment: Deployment, record: Record, stop: threading.Event, seed: int, role: str) -> None:
    rng = random.Random(seed)
    with _client(deployment) as client:
        while not stop.is_set():
            with record.lock:
                keys = list(record.keys)
                sealed = list(record.ciphertexts)
            if role == "create" or not keys:
                key = _call(record, "CreateKey", client.create_key)
                if key is not None:
                    with record.lock:
                        record.keys.append(key.key_id)
                stop.wait(0.05)  # the pace of this caller's traffic to the real deployment
            elif role == "encrypt":
                key_id = rng.choice(keys)
                plaintext = os.urandom(rng.randrange(1, 512))
                result = _call(record, "Encrypt", client.encrypt, key_id, plaintext)
                if result is not None:
                    with record.lock:
                        record.ciphertexts.append((key_id, result.ciphertext, plaintext))
            elif role == "decrypt" and sealed:
                key_id, ciphertext, plaintext = rng.choice(sealed)
                opened = _call(record, "Decrypt", client.decrypt, ciphertext)
                if opened is not None and opened.plaintext != plaintext:
                    with record.lock:
                        record.violations.append(f"Decrypt of a {key_id} ciphertext returned other bytes")
            elif role == "rotate":
                _call(record, "RotateKey", client.rotate_key, rng.choice(keys))
                stop.wait(0.2)  # the pace of this caller's traffic to the real deployment
            elif role == "datakey":
                data_key = _call(record, "GenerateDataKey", client.generate_data_key, rng.choice(keys))
                if data_key is not None:
                    opened = _call(record, "Decrypt", client.decrypt, data_key.ciphertext)
                    if opened is not None and opened.plaintext != data_key.plaintext:
                        with record.lock:
                            record.violations.append("a data key did not unwrap to itself")
            elif role == "stream":
                key_id = rng.choice(keys)
                body = os.urandom(rng.randrange(1, 300_000))
                try:
                    sealed_stream = b"".join(client.encrypt_stream(key_id, [body], timeout=10))
                    opened_stream = b"".join(client.decrypt_stream([sealed_stream], timeout=10))
                except CryptoClientError as error:
                    record.failed("Stream", error)
                    continue
                record.count("Stream")
                if opened_stream != body:
                    with record.lock:
                        record.violations.append("a stream did not round-trip")
            else:
                stop.wait(0.01)  # nothing to decrypt yet: the other callers are making it


def _toggler(deployment: Deployment, record: Record, stop: threading.Event) -> None:
    """Disable a key, then watch every live replica refuse it directly; then enable it again."""
    with _client(deployment) as client:
        key = None
        while key is None and not stop.is_set():
            key = _call(record, "CreateKey", client.create_key)
        if key is None:
            return
        with record.lock:
            record.toggled_keys.append(key.key_id)
        while not stop.is_set():
            for replica in deployment.replicas:
                if replica is not None:
                    _direct_encrypt(replica, key.key_id)  # hold it in every replica's memory
            if _call(record, "DisableKey", client.disable_key, key.key_id) is None:
                continue
            disabled_at = time.monotonic()
            for index, replica in enumerate(list(deployment.replicas)):
                if replica is None or deployment.frozen_replica:
                    continue
                while time.monotonic() - disabled_at < 10 and _direct_encrypt(replica, key.key_id) == "OK":
                    stop.wait(0.02)  # measuring how long the real replica takes to hear of the disable
                took = time.monotonic() - disabled_at
                with record.lock:
                    record.disable_latencies.append(took)
                    if took > DISABLE_BOUND_S:
                        record.disable_late.append(f"replica {index}: {took:.2f}s at {disabled_at:.1f}")
            while _call(record, "EnableKey", client.enable_key, key.key_id) is None and not stop.is_set():
                stop.wait(0.2)  # the deployment refused (a fault): try again shortly
            stop.wait(1.0)  # the pace of the toggles


def _direct_encrypt(replica: CryptoServerProcess, key_id: str) -> str:
    with grpc.insecure_channel(replica.address) as channel:
        stub = crypto_service_pb2_grpc.CryptoServiceStub(channel)
        try:
            stub.Encrypt(crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=key_id, plaintext=b"p"), timeout=2)
        except grpc.RpcError as error:
            return error.code().name
    return "OK"


def _health(deployment: Deployment, record: Record, stop: threading.Event) -> None:
    channels: dict[int, grpc.Channel] = {}
    while not stop.is_set():
        for index, port in enumerate(deployment.ports):
            replica = deployment.replicas[index]
            if replica is None or (index == 1 and deployment.frozen_replica):
                continue
            channel = channels.setdefault(index, grpc.insecure_channel(f"127.0.0.1:{port}"))
            started = time.monotonic()
            try:
                health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_LIMIT_S)
                with record.lock:
                    record.health_samples.append(time.monotonic() - started)
            except grpc.RpcError as error:
                if deployment.replicas[index] is replica and not (index == 1 and deployment.frozen_replica):
                    with record.lock:
                        record.health_failures.append(f"replica {index}: {error.code().name}")
        stop.wait(0.1)  # a probe's period, as Kubernetes probes the real replicas
    for channel in channels.values():
        channel.close()


def _faults(deployment: Deployment, record: Record, stop: threading.Event, rng: random.Random) -> None:
    """One fault at a time, at random moments; each is healed before the next."""
    kinds = ["kill redis", "freeze redis", "freeze mongo", "kill mongo", "kill replica", "freeze replica"]
    while not stop.wait(rng.uniform(2.0, 5.0)):
        kind = rng.choice(kinds)
        length = rng.uniform(1.0, 4.0)
        started = time.monotonic()
        with _fault(deployment, kind):
            stop.wait(length)
        ended = time.monotonic()
        with record.lock:
            record.faults.append({"fault": kind, "from": round(started, 1), "to": round(ended, 1)})
            if "mongo" in kind:
                record.store_down.append((started, ended + 2.0))


@contextmanager
def _fault(deployment: Deployment, kind: str) -> Iterator[None]:
    if kind == "kill redis":
        deployment.redis.kill()
        try:
            yield
        finally:
            deployment.redis.start()
    elif kind == "freeze redis":
        with deployment.redis.frozen():
            yield
    elif kind == "freeze mongo":
        with deployment.mongo.frozen():
            yield
    elif kind == "kill mongo":
        deployment.mongo.kill()
        try:
            yield
        finally:
            deployment.mongo.start()
    elif kind == "kill replica":
        replica = deployment.replicas[1]
        assert replica is not None
        deployment.replicas[1] = None
        replica.kill()
        try:
            yield
        finally:
            deployment.start_replica(1)
    else:  # freeze replica
        replica = deployment.replicas[1]
        assert replica is not None
        deployment.frozen_replica = True
        os.kill(replica.process.pid, 19)  # SIGSTOP
        try:
            yield
        finally:
            os.kill(replica.process.pid, 18)  # SIGCONT
            deployment.frozen_replica = False


def _final_checks(deployment: Deployment, record: Record) -> dict[str, Any]:
    """With every fault healed: keys, ciphertexts and versions, checked through each replica alone."""
    lost_keys = undecryptable = bad_versions = 0
    with record.lock:
        keys = list(record.keys) + list(record.toggled_keys)
        sealed = list(record.ciphertexts)
    for port in deployment.ports:
        with CryptoClient(f"127.0.0.1:{port}", TENANT, ClientConfig(timeout_s=10.0)) as client:
            for key_id in keys:
                try:
                    key = client.get_key(key_id, use_cache=False)
                except CryptoClientError:
                    lost_keys += 1
                    continue
                numbers = [v.version for v in client.iter_key_versions(key_id)]
                if numbers != list(range(1, len(numbers) + 1)) or key.primary_version != len(numbers):
                    bad_versions += 1
            # In batches: a run confirms tens of thousands of ciphertexts.
            for start in range(0, len(sealed), 500):
                chunk = sealed[start : start + 500]
                results = client.batch_decrypt([DecryptItem(ciphertext) for _, ciphertext, _ in chunk])
                for (_, _, plaintext), result in zip(chunk, results, strict=True):
                    if isinstance(result, KeyDisabledError):
                        continue  # a toggled key caught disabled: not a lost ciphertext
                    if isinstance(result, CryptoClientError) or result.plaintext != plaintext:
                        undecryptable += 1
    return {"confirmed_keys_lost": lost_keys, "ciphertexts_not_decrypting": undecryptable, "bad_versions": bad_versions}


def run(seed: int, duration_s: float, workdir: Path) -> dict[str, Any]:
    rng = random.Random(seed)
    deployment = Deployment(workdir)
    record = Record()
    stop_load, stop_faults = threading.Event(), threading.Event()
    roles = ["create", "encrypt", "encrypt", "decrypt", "decrypt", "rotate", "datakey", "stream"]
    threads = [
        threading.Thread(target=_load, args=(deployment, record, stop_load, seed * 100 + n, role), daemon=True)
        for n, role in enumerate(roles)
    ]
    threads += [
        threading.Thread(target=_toggler, args=(deployment, record, stop_load), daemon=True),
        threading.Thread(target=_health, args=(deployment, record, stop_load), daemon=True),
    ]
    fault_thread = threading.Thread(target=_faults, args=(deployment, record, stop_faults, rng), daemon=True)
    started = time.monotonic()
    try:
        deployment.start()
        for thread in threads:
            thread.start()
        fault_thread.start()
        time.sleep(duration_s)  # the real deployment runs under load and faults this long
        stop_faults.set()
        fault_thread.join(timeout=30)
        time.sleep(3.0)  # the real deployment settles: every fault healed, load still running
        stop_load.set()
        for thread in threads:
            thread.join(timeout=30)
        final = _final_checks(deployment, record)
    finally:
        deployment.stop()
    samples = sorted(record.health_samples)

    def percentile(q: float) -> float:
        return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 1) if samples else 0.0

    late_while_store_up = [
        late
        for late in record.disable_late
        if not any(a <= float(late.rsplit(" ", 1)[1]) <= b for a, b in record.store_down)
    ]
    return {
        "seed": seed,
        "duration_s": round(time.monotonic() - started, 1),
        "faults": record.faults,
        "calls_ok": dict(record.calls),
        "retriable_errors_seen_by_callers": dict(record.retriable),
        "non_retriable_errors_caused_by_faults": record.violations[:50],
        **final,
        "disable_refused_within_s": {
            "bound_s": DISABLE_BOUND_S,
            "max": round(max(record.disable_latencies, default=0.0), 2),
            "late_while_store_up": late_while_store_up,
            "late_while_store_down": len(record.disable_late) - len(late_while_store_up),
            "samples": len(record.disable_latencies),
        },
        "health_ms": {
            "samples": len(samples),
            "p50": percentile(0.5),
            "p99": percentile(0.99),
            "max": percentile(1.0),
            "over_100ms": sum(1 for s in samples if s > HEALTH_TARGET_S),
            "failures": record.health_failures[:20],
        },
    }


def violations(report: dict[str, Any]) -> list[str]:
    """The invariants that failed, as sentences (empty when the run kept every promise)."""
    found = []
    for name in ("confirmed_keys_lost", "ciphertexts_not_decrypting", "bad_versions"):
        if report[name]:
            found.append(f"{name}: {report[name]}")
    if report["non_retriable_errors_caused_by_faults"]:
        found.append(f"non-retriable errors: {report['non_retriable_errors_caused_by_faults'][:5]}")
    if report["disable_refused_within_s"]["late_while_store_up"]:
        found.append(f"disabled key served too long: {report['disable_refused_within_s']['late_while_store_up']}")
    if report["health_ms"]["failures"]:
        found.append(f"health did not answer within {HEALTH_LIMIT_S}s: {report['health_ms']['failures']}")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of faults (at most 150)")
    parser.add_argument("--report", type=Path, default=Path("bench/results/chaos.json"))
    arguments = parser.parse_args(argv)
    duration = min(150.0, max(5.0, arguments.duration))
    with tempfile.TemporaryDirectory(prefix="caas-chaos-") as workdir:
        report = run(arguments.seed, duration, Path(workdir))
    failed = violations(report)
    report["invariants_failed"] = failed
    arguments.report.parent.mkdir(parents=True, exist_ok=True)
    arguments.report.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "faults"}, indent=2))
    print(f"{len(report['faults'])} faults; report in {arguments.report}")
    if failed:
        print("INVARIANTS FAILED:\n- " + "\n- ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
