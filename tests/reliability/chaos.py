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
- usage counts never below the truth: every version's stored encryption count (read from the database) is at
  least the encryptions the load saw confirmed with it (Encrypt, GenerateDataKey), and never negative;
- a load thread that meets anything but a client error records it as a violation (it never dies silently);
- a disabled key refused on every replica within the stated bound (CRYPTO_INVALIDATION_INTERVAL + margin),
  counted separately when the database itself was down at the time (the bound needs the store);
- health answered within 100 ms at every sample of a replica that was up (reported; 1 s is asserted).

Faults: Redis killed, frozen, or killed and restarted from a snapshot taken earlier in the run (a failover to a
lagging replica, a restore); MongoDB killed, frozen, frozen and thawed in short cycles (what made usage
counts go negative: give-backs timed out after they landed), or failing over (fail points: NotWritablePrimary,
InterruptedDueToReplStateChange, ShutdownInProgress, a dropped connection, a command held past the store
timeout, on every kind of round trip); a replica killed or frozen; and, some of the time, two of these at once
on different processes.

Run: `make chaos` (or `python -m tests.reliability.chaos --seed 7 --duration 120`).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pymongo
import redis
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from crypto_client import ClientConfig, CryptoClient, DecryptItem, Key, RetryPolicy
from crypto_client.errors import (
    CryptoClientError,
    DeadlineExceededError,
    ServiceUnavailableError,
)
from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import crypto_service_pb2_grpc
from tests.servers import CryptoServerProcess, MongoServer, RedisServer, ServerProcess, free_port

TENANT = "chaos"
DATABASE = "chaos"
# What a caller may see after the client's retries when a fault hit its call: it retries those itself.
RETRIABLE = (ServiceUnavailableError, DeadlineExceededError)
DISABLE_BOUND_S = 2.0
# A copy from a cache that lost writes is used for at most CRYPTO_INVALIDATION_INTERVAL (1 s) plus a store round
# trip after it was read (docs/reliability.md): the final check reads a key shown stale again after this.
STALE_COPY_BOUND_S = 3.0
FINAL_DECRYPT_ATTEMPTS = 5
STORE_TIMEOUT_S = 1.0
HEALTH_TARGET_S = 0.1
HEALTH_LIMIT_S = 1.0


@dataclass
class Record:
    """Everything the load confirmed, and everything that went wrong."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    keys: list[str] = field(default_factory=list)
    toggled_keys: list[str] = field(default_factory=list)
    # (key id, ciphertext, plaintext): Encrypt results and wrapped data keys.
    ciphertexts: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    # (key id, sealed stream, its body's SHA-256), a bounded sample of the streams: each is up to 300 KB.
    streams: list[tuple[str, bytes, bytes]] = field(default_factory=list)
    # Encryptions confirmed per (key id, version): the floor of the stored usage count.
    encryptions: Counter[tuple[str, int]] = field(default_factory=Counter)
    calls: Counter[str] = field(default_factory=Counter)
    retriable: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)
    health_samples: list[float] = field(default_factory=list)
    health_failures: list[str] = field(default_factory=list)
    disable_latencies: list[float] = field(default_factory=list)
    # (replica, disabled at, seconds until refused) for every disable refused later than the bound.
    disable_late: list[tuple[int, float, float]] = field(default_factory=list)
    faults: list[dict[str, Any]] = field(default_factory=list)
    store_down: list[tuple[float, float]] = field(default_factory=list)

    def count(self, name: str) -> None:
        with self.lock:
            self.calls[name] += 1

    def failed(self, name: str, error: Exception) -> None:
        with self.lock:
            if isinstance(error, RETRIABLE):
                # With its reason: a run of refusals after a fault is told apart by it (STORE_UNAVAILABLE, ...).
                reason = getattr(error, "reason", "") or "no reason"
                self.retriable[f"{name}:{type(error).__name__}:{reason}"] += 1
            else:
                self.violations.append(f"{name}: {type(error).__name__}: {error}")

    def violation(self, text: str) -> None:
        with self.lock:
            self.violations.append(text)


class Deployment:
    """MongoDB, Redis and two replicas on fixed loopback ports."""

    def __init__(self, directory: Path) -> None:
        self.mongo = MongoServer(directory / "mongo", test_commands=True)  # fail points: a fail-over
        self.redis = RedisServer(directory / "redis")
        self.ports = [free_port(), free_port()]
        self.env = {
            "MONGODB_DATABASE": DATABASE,
            "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
            "CRYPTO_HEALTH_INTERVAL": "0.5",
            "CRYPTO_SHUTDOWN_GRACE": "5",
            # Shorter than the default 5 s, so that database freezes outlast it: store calls then time out,
            # and some of them land once the database thaws (a write whose outcome the server cannot know).
            "CRYPTO_STORE_TIMEOUT": str(STORE_TIMEOUT_S),
        }
        self.replicas: list[CryptoServerProcess | None] = [None, None]
        self.frozen_replica = False
        self.redis_dump = directory / "redis" / "dump.rdb"  # what redis-server loads when it starts
        self.failover_rng = random.Random(0)  # which fail-over answer; reseeded by run()
        self.restarts: list[threading.Thread] = []

    def redis_snapshot(self) -> Path:
        """Redis's data now, in a file of its own (SAVE writes the dump file; it is moved aside)."""
        with redis.Redis(host="127.0.0.1", port=self.redis.port, socket_timeout=10) as client:
            client.save()
        snapshot = self.redis_dump.with_name("snapshot.rdb")
        self.redis_dump.rename(snapshot)
        return snapshot

    def start(self) -> None:
        self.mongo.start()
        self.redis.start()
        self.env.update(MONGODB_URI=self.mongo.uri, REDIS_URL=self.redis.url)
        for index in range(2):
            self.start_replica(index)

    def start_replica(self, index: int) -> None:
        """Start replica `index` as a supervisor (Kubernetes) would: a replica that exits at start-up (exit 3:
        the database did not answer, as when another fault has it down) is started again, for up to a minute."""
        deadline = time.monotonic() + 80.0
        while True:
            try:
                self.replicas[index] = CryptoServerProcess.launch(
                    {**self.env, "CRYPTO_PORT": str(self.ports[index])}, keep_rpc_lines=False
                )
                return
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)  # a restart policy's back-off before the next start of the real replica

    def restart_replica(self, index: int) -> None:
        """Start replica `index` again on a thread of its own (start_replica's retries wait for the database)."""
        restart = threading.Thread(target=self.start_replica, args=(index,), daemon=True)
        restart.start()
        self.restarts.append(restart)

    def restarted(self, timeout_s: float = 90.0) -> bool:
        """Wait for every restart under way; whether every replica is running."""
        for restart in self.restarts:
            restart.join(timeout_s)
        return all(replica is not None for replica in self.replicas)

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


def _recording_failures(target: Callable[..., None]) -> Callable[..., None]:
    """A load thread that meets anything but a client error (a bug in the client, a malformed answer) records
    it as a violation and goes on, instead of ending silently and taking its share of the load with it."""

    def guarded(*args: Any) -> None:
        record: Record = args[1]
        stop: threading.Event = args[2]
        while not stop.is_set():
            try:
                target(*args)
                return
            except Exception as error:  # every failure is a finding of the run
                record.violation(f"{target.__name__} thread: {type(error).__name__}: {error}")
                stop.wait(0.5)  # the pace of a restarted load thread's traffic to the real deployment

    return guarded


STREAMS_KEPT = 200


@_recording_failures
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
                        record.encryptions[(result.key_id, result.key_version)] += 1
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
                    assert data_key.plaintext is not None
                    with record.lock:
                        record.ciphertexts.append((data_key.key_id, data_key.ciphertext, data_key.plaintext))
                        record.encryptions[(data_key.key_id, data_key.key_version)] += 1
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
                with record.lock:
                    if opened_stream != body:
                        record.violations.append("a stream did not round-trip")
                    elif len(record.streams) < STREAMS_KEPT:
                        record.streams.append((key_id, sealed_stream, hashlib.sha256(body).digest()))
            else:
                stop.wait(0.01)  # nothing to decrypt yet: the other callers are making it


@_recording_failures
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
                took = _until_refused(deployment, index, replica, key.key_id, disabled_at, stop)
                if took is None:
                    continue  # the replica was killed or frozen meanwhile: no sample
                with record.lock:
                    record.disable_latencies.append(took)
                    if took > DISABLE_BOUND_S:
                        record.disable_late.append((index, disabled_at, took))
            while _call(record, "EnableKey", client.enable_key, key.key_id) is None and not stop.is_set():
                stop.wait(0.2)  # the deployment refused (a fault): try again shortly
            stop.wait(1.0)  # the pace of the toggles


KEY_DISABLED = "FAILED_PRECONDITION:ERROR_REASON_KEY_DISABLED"


def _until_refused(
    deployment: Deployment,
    index: int,
    replica: CryptoServerProcess | None,
    key_id: str,
    disabled_at: float,
    stop: threading.Event,
) -> float | None:
    """Seconds from the disable until `replica` refuses the key itself; None when the replica is not the one
    running throughout (killed, replaced or frozen meanwhile: a process that is down answers nothing either way)."""

    def running() -> bool:
        return deployment.replicas[index] is replica and not (index == 1 and deployment.frozen_replica)

    # Only the disabled key's own refusal counts: UNAVAILABLE (a fault) says nothing either way.
    while replica is not None and running() and time.monotonic() - disabled_at < 10:
        if _direct_encrypt(replica, key_id) == KEY_DISABLED:
            return time.monotonic() - disabled_at if running() else None
        stop.wait(0.02)  # measuring how long the real replica takes to hear of the disable
    return time.monotonic() - disabled_at if replica is not None and running() else None


def _direct_encrypt(replica: CryptoServerProcess, key_id: str) -> str:
    """ "OK", or the refusal as "CODE:REASON" (the ErrorInfo reason, when the answer carries one)."""
    with grpc.insecure_channel(replica.address) as channel:
        stub = crypto_service_pb2_grpc.CryptoServiceStub(channel)
        try:
            stub.Encrypt(crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=key_id, plaintext=b"p"), timeout=2)
        except grpc.RpcError as error:
            return f"{error.code().name}:{_reason(error)}"
    return "OK"


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason
    return ""


@_recording_failures
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


FAULT_KINDS = [
    "kill redis",
    "freeze redis",
    "rewind redis",
    "freeze mongo",
    "kill mongo",
    "freeze mongo cycles",
    "failover mongo",
    "kill replica",
    "freeze replica",
]
# Which process a fault acts on: two faults at once act on two different processes.
_TARGET = {kind: kind.split()[1] for kind in FAULT_KINDS}
OVERLAP_CHANCE = 0.3
# The fail-over faults (MongoServer.fail_point): the errors a stepping-down primary answers, a dropped
# connection, and a command held past the store timeout and applied after the caller gave up.
FAILOVER_COMMANDS = ["insert", "update", "findAndModify", "find", "delete"]
FAILOVER_ANSWERS: list[dict[str, Any]] = [
    {"error_code": 10107},  # NotWritablePrimary
    {"error_code": 11602},  # InterruptedDueToReplStateChange
    {"error_code": 91},  # ShutdownInProgress
    {"close_connection": True},
    {"block_ms": int(STORE_TIMEOUT_S * 1000) + 500},
]


def _faults(
    deployment: Deployment,
    record: Record,
    stop: threading.Event,
    rng: random.Random,
    opening: Sequence[tuple[str, float]],
) -> None:
    """The `opening` faults (kind, seconds) one after the other, then faults at random moments; some of the time
    a second one on another process starts while the first is on, and the two end in either order. Each round
    is healed before the next."""
    planned = list(opening)
    while not stop.wait(rng.uniform(2.0, 5.0)):
        if not deployment.restarted():  # a round begins with both replicas running
            record.violation("a killed replica could not be started again within 90 s")
        second = None
        if planned:
            kind, length = planned.pop(0)
        else:
            kind, length = rng.choice(FAULT_KINDS), rng.uniform(1.0, 4.0)
            if rng.random() < OVERLAP_CHANCE:
                second = rng.choice([k for k in FAULT_KINDS if _TARGET[k] != _TARGET[kind]])
        second_from, second_length = rng.uniform(0.0, length), rng.uniform(0.5, 4.0)
        with ExitStack() as first_fault:
            started = _begin(deployment, first_fault, kind)
            if second is None:
                stop.wait(length)
                first_fault.close()
                _ended(record, kind, started)
                continue
            stop.wait(second_from)
            with ExitStack() as second_fault:
                second_started = _begin(deployment, second_fault, second)
                # The two end in the order their lengths say: the second inside the first, or after it.
                ends = sorted(
                    [
                        (length, kind, started, first_fault),
                        (second_from + second_length, second, second_started, second_fault),
                    ],
                    key=lambda end: end[0],
                )
                waited = second_from
                for at, ending, began, fault in ends:
                    stop.wait(max(0.0, at - waited))
                    waited = at
                    fault.close()
                    _ended(record, ending, began)


def _begin(deployment: Deployment, faults: ExitStack, kind: str) -> float:
    faults.enter_context(_fault(deployment, kind))
    return time.monotonic()


def _ended(record: Record, kind: str, started: float) -> None:
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
    elif kind == "rewind redis":
        # A snapshot now; at the end of the fault Redis dies and comes back from it, having lost every write
        # made in between (a failover to a lagging replica, a restore from backup).
        snapshot = deployment.redis_snapshot()
        try:
            yield
        finally:
            deployment.redis.kill()
            snapshot.rename(deployment.redis_dump)
            deployment.redis.start()
            deployment.redis_dump.unlink(missing_ok=True)  # a later kill restarts from nothing, as before
    elif kind == "freeze mongo":
        with deployment.mongo.frozen():
            yield
    elif kind == "freeze mongo cycles":
        with _freeze_cycles(deployment.mongo):
            yield
    elif kind == "failover mongo":
        # What a fail-over does to the driver, on every kind of round trip the service makes, while it lasts.
        deployment.mongo.fail_point(FAILOVER_COMMANDS, **deployment.failover_rng.choice(FAILOVER_ANSWERS))
        try:
            yield
        finally:
            deployment.mongo.clear_fail_points()
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
            # Not here and now: another fault (the database down) may hold its start-up, and this thread
            # is the one that ends that fault.
            deployment.restart_replica(1)
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


@contextmanager
def _freeze_cycles(server: ServerProcess) -> Iterator[None]:
    """The process frozen a little longer than the store timeout, then running 0.3 s, over and over while the
    fault lasts: calls time out, and the writes among them land when it thaws (what made usage counts go
    negative: give-backs timed out after they landed, and were given back again)."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            with server.frozen():
                done.wait(STORE_TIMEOUT_S + 0.3)
            done.wait(0.3)

    cycler = threading.Thread(target=cycle, daemon=True)
    cycler.start()
    try:
        yield
    finally:
        done.set()
        cycler.join()


def _final_checks(deployment: Deployment, record: Record) -> dict[str, Any]:
    """With every fault healed: keys, their state, ciphertexts, streams and versions, checked through each
    replica alone against the database; and the usage counts in the database against the confirmed load."""
    undecryptable = bad_versions = 0
    stale_states: list[str] = []
    unreadable: list[str] = []  # keys a replica could not read: lost, or broken by a bad record
    refused_changes: list[str] = []  # key changes refused with every fault healed
    refused_batches: list[str] = []
    failures: Counter[str] = Counter()  # why a confirmed ciphertext did not decrypt, by answer
    retried: Counter[str] = Counter()  # items refused with a retriable error, then tried again
    failed_keys: set[str] = set()
    # (port, key id) shown otherwise than the database holds it: read again once the bound for a copy from a
    # cache that lost writes has passed (the first read after a rewind may serve it, docs/reliability.md).
    suspects: list[tuple[int, str]] = []
    with record.lock:
        keys = list(record.keys)
        toggled = list(record.toggled_keys)
        sealed = list(record.ciphertexts)
        streams = list(record.streams)
        confirmed = Counter(record.encryptions)
    stored = _stored_keys(deployment)
    for port in deployment.ports:
        with CryptoClient(f"127.0.0.1:{port}", TENANT, ClientConfig(timeout_s=30.0)) as client:
            for key_id in toggled:  # left enabled: every ciphertext must then decrypt
                try:
                    client.enable_key(key_id)
                except CryptoClientError as error:
                    refused_changes.append(f"port {port}: EnableKey {key_id}: {error}")
            for key_id in keys + toggled:
                try:
                    key = client.get_key(key_id, use_cache=False)
                    numbers = [v.version for v in client.iter_key_versions(key_id)]
                except CryptoClientError as error:
                    unreadable.append(f"port {port}: {key_id}: {error}")
                    continue
                if numbers != list(range(1, len(numbers) + 1)):  # as the database holds them
                    bad_versions += 1
                if _view(key) != stored.get(key_id, _view(key)) or key.primary_version != len(numbers):
                    suspects.append((port, key_id))
            # In batches: a run confirms tens of thousands of ciphertexts. An item refused with an error a
            # caller retries (the store busy: an old version read for the first time) is tried again, as a caller
            # would, a few times; only what still fails, or fails otherwise, counts.
            pending = list(sealed)
            for attempt in range(FINAL_DECRYPT_ATTEMPTS):
                again: list[tuple[str, bytes, bytes]] = []
                for start in range(0, len(pending), 100):
                    chunk = pending[start : start + 100]
                    try:
                        results = client.batch_decrypt([DecryptItem(ciphertext) for _, ciphertext, _ in chunk])
                    except CryptoClientError as error:  # the batch as a whole: counted, and the check goes on
                        undecryptable += len(chunk)
                        refused_batches.append(f"port {port}: BatchDecrypt of {len(chunk)}: {error}")
                        continue
                    for item, result in zip(chunk, results, strict=True):
                        last = attempt == FINAL_DECRYPT_ATTEMPTS - 1
                        if isinstance(result, RETRIABLE) and not last:
                            again.append(item)
                            retried[f"port {port}: {result}"[:200]] += 1
                        elif isinstance(result, CryptoClientError):
                            undecryptable += 1
                            failures[f"port {port}: {result}"[:200]] += 1
                            failed_keys.add(item[0])
                        elif result.plaintext != item[2]:
                            undecryptable += 1
                            failures[f"port {port}: other bytes"] += 1
                if not again:
                    break
                pending = again
                time.sleep(1.0)  # a caller's back-off before retrying the real replica
            for _, sealed_stream, digest in streams:
                try:
                    opened = b"".join(client.decrypt_stream([sealed_stream], timeout=30))
                except CryptoClientError:
                    undecryptable += 1
                    continue
                if hashlib.sha256(opened).digest() != digest:
                    undecryptable += 1
    if suspects:
        time.sleep(STALE_COPY_BOUND_S)  # the bound the real replicas are held to
    for port, key_id in suspects:
        with CryptoClient(f"127.0.0.1:{port}", TENANT, ClientConfig(timeout_s=30.0)) as client:
            try:
                key = client.get_key(key_id, use_cache=False)
            except CryptoClientError as error:
                unreadable.append(f"port {port}: {key_id}: {error}")
                continue
        if _view(key) != stored.get(key_id, _view(key)):
            stale_states.append(f"port {port}: {key_id} shown as {key.primary_version}/{key.state.name}")
    counts = _stored_counts(deployment)
    below = [
        f"{key_id} v{version}: stored {counts.get((key_id, version))}, confirmed {made}"
        for (key_id, version), made in sorted(confirmed.items())
        if counts.get((key_id, version), 0) < made
    ]
    negative = [f"{key_id} v{version}: {count}" for (key_id, version), count in sorted(counts.items()) if count < 0]
    return {
        "confirmed_keys_unreadable": unreadable[:20],
        "key_changes_refused_after_recovery": refused_changes[:20],
        "ciphertexts_not_decrypting": undecryptable,
        "ciphertexts_checked": len(sealed),
        "batches_refused": refused_batches[:20],
        "decrypt_failures": dict(failures.most_common(10)),
        "decrypts_retried": dict(retried.most_common(10)),
        "keys_of_failed_decrypts": sorted(failed_keys)[:10],
        "streams_checked": len(streams),
        "bad_versions": bad_versions,
        "states_unlike_the_database": stale_states[:20],
        "states_stale_at_first_read_then_current": len(suspects) - len(stale_states),
        "usage_counts": {
            "versions_checked": len(confirmed),
            "encryptions_confirmed": sum(confirmed.values()),
            "stored_below_confirmed": below[:20],
            "stored_negative": negative[:20],
        },
    }


RECOVERY_BOUND_S = 30.0


def _recovery(deployment: Deployment) -> float | None:
    """Seconds, once every fault is healed, until both replicas answer KeyService SERVING and take a key change
    (None: not within RECOVERY_BOUND_S, without a restart)."""
    started = time.monotonic()
    while time.monotonic() - started < RECOVERY_BOUND_S:
        if all(_takes_key_changes(port) for port in deployment.ports):
            return round(time.monotonic() - started, 2)
        time.sleep(0.2)  # the pace of the real replicas' recovery checks
    return None


def _takes_key_changes(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="caas.crypto.v1.KeyService"), timeout=2
            )
            if health.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        except grpc.RpcError:
            return False
    with CryptoClient(
        f"127.0.0.1:{port}", TENANT, ClientConfig(timeout_s=5.0, retry=RetryPolicy(max_attempts=1))
    ) as client:
        try:
            client.create_key()
        except CryptoClientError:
            return False
    return True


def _server_errors(deployment: Deployment) -> dict[str, int]:
    """The error lines the running replicas logged, counted by message and error: what a failed run is read by."""
    found: Counter[str] = Counter()
    for replica in deployment.replicas:
        for entry in replica.logs() if replica is not None else []:
            if entry.get("level") in ("error", "critical"):
                found[f"{entry.get('msg')}: {entry.get('error', entry.get('exc_info', ''))}"[:300]] += 1
    return dict(found.most_common(30))


def _view(key: Key) -> tuple[int, bool]:
    return key.primary_version, key.state.name == "DISABLED"


def _database(deployment: Deployment) -> Any:
    return pymongo.MongoClient(deployment.mongo.uri, serverSelectionTimeoutMS=10_000)


def _stored_keys(deployment: Deployment) -> dict[str, tuple[int, bool]]:
    """(primary version, disabled) of every key, as the database holds it."""
    with _database(deployment) as client:
        keys = client[DATABASE]["keys"].find({"tenant_id": TENANT}, {"primary_version": 1, "disabled": 1})
        return {key["_id"]: (int(key["primary_version"]), bool(key["disabled"])) for key in keys}


def _stored_counts(deployment: Deployment) -> dict[tuple[str, int], int]:
    """Every version's encryption count as the database holds it: in the key document (a key's first version)
    or in `key_versions` (the ones rotations made)."""
    counts: dict[tuple[str, int], int] = {}
    with _database(deployment) as client:
        database = client[DATABASE]
        for key in database["keys"].find({"tenant_id": TENANT}, {"versions.version": 1, "versions.encryptions": 1}):
            for version in key.get("versions", []):
                counts[(key["_id"], int(version["version"]))] = int(version.get("encryptions", 0))
        for version in database["key_versions"].find({}, {"key_id": 1, "version": 1, "encryptions": 1}):
            counts[(version["key_id"], int(version["version"]))] = int(version.get("encryptions", 0))
    return counts


def run(seed: int, duration_s: float, workdir: Path, opening: Sequence[tuple[str, float]] = ()) -> dict[str, Any]:
    """One chaos run: `opening` faults (kind, seconds) first, then the seeded schedule, for `duration_s`."""
    rng = random.Random(seed)
    deployment = Deployment(workdir)
    deployment.failover_rng = random.Random(seed + 1)
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

    def faults() -> None:
        try:
            _faults(deployment, record, stop_faults, rng, opening)
        except Exception as error:  # a fault that could not be injected or healed is a finding
            record.violation(f"the fault scheduler failed: {type(error).__name__}: {error}"[:500])

    fault_thread = threading.Thread(target=faults, daemon=True)
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
        if not deployment.restarted():
            record.violation("a killed replica could not be started again within 90 s")
        recovered_in = _recovery(deployment)
        final = _final_checks(deployment, record)
        server_errors = _server_errors(deployment)
    finally:
        deployment.stop()
    samples = sorted(record.health_samples)

    def percentile(q: float) -> float:
        return round(samples[min(len(samples) - 1, int(q * len(samples)))] * 1000, 1) if samples else 0.0

    # The bound needs the store: a disable whose wait for the refusal overlapped a database fault is not held to it.
    late_while_store_up = [
        f"replica {index}: {took:.2f}s at {at:.1f}"
        for index, at, took in record.disable_late
        if not any(a <= at + took and at <= b for a, b in record.store_down)
    ]
    return {
        "seed": seed,
        "duration_s": round(time.monotonic() - started, 1),
        "faults": record.faults,
        "calls_ok": dict(record.calls),
        "retriable_errors_seen_by_callers": dict(record.retriable),
        "non_retriable_errors_caused_by_faults": record.violations[:50],
        "recovered_in_s": recovered_in,
        **final,
        "server_errors": server_errors,
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
    for name in (
        "confirmed_keys_unreadable",
        "ciphertexts_not_decrypting",
        "bad_versions",
        "states_unlike_the_database",
    ):
        if report[name]:
            found.append(f"{name}: {report[name]}")
    for name in ("stored_below_confirmed", "stored_negative"):
        if report["usage_counts"][name]:
            found.append(f"usage counts {name}: {report['usage_counts'][name]}")
    if report["non_retriable_errors_caused_by_faults"]:
        found.append(f"non-retriable errors: {report['non_retriable_errors_caused_by_faults'][:5]}")
    if report["disable_refused_within_s"]["late_while_store_up"]:
        found.append(f"disabled key served too long: {report['disable_refused_within_s']['late_while_store_up']}")
    if report["recovered_in_s"] is None:
        found.append(f"the replicas did not take key changes within {RECOVERY_BOUND_S}s of the last fault's end")
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
