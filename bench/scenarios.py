"""The benchmark scenarios (docs/performance.md says what each means).

Every figure is measured `repetitions` times and reported as median, min and
max; ratios are taken against baselines measured in the same run, on the same
server process, with the same load generator.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import trustme
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import Message

from bench import h2load, pyload
from bench.echo_server import ECHO_METHOD, ECHO_STREAM_METHOD, SEAL_METHOD
from bench.processes import cpu_seconds_of_tree
from crypto_client import ClientConfig, CryptoClient, FileCipher, KeyType
from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import key_service_pb2_grpc, resources_pb2
from tests.servers import CryptoServerProcess, MongoServer, RedisServer, SoftHsm, find_softhsm_library

ENCRYPT = "/caas.crypto.v1.CryptoService/Encrypt"
DECRYPT = "/caas.crypto.v1.CryptoService/Decrypt"
BATCH_ENCRYPT = "/caas.crypto.v1.CryptoService/BatchEncrypt"
BATCH_DECRYPT = "/caas.crypto.v1.CryptoService/BatchDecrypt"
BATCH_ITEMS = 100
TENANT = "bench"
KIB = 1024
MIB = 1024 * 1024


@dataclass(frozen=True)
class Phases:
    """How much work each scenario does; `make bench-quick` uses shorter phases."""

    repetitions: int
    unary_requests: int  # per run, at 16 and 64 in flight
    single_requests: int  # per run, at 1 in flight
    cold_keys: int
    cold_tenants: int  # tenants whose first use after a restart is measured, per root key provider
    large_sizes_mib: tuple[int, int]
    key_management_ops: int
    backends_in_flight: tuple[int, ...]  # in-flight levels measured on MongoDB + Redis too
    # The scenarios that compare today's server with an older one extracted from git history (batches, key
    # lifecycle): two servers each, a minute or more; full runs only.
    against_history: bool = True
    # key_aging: per backend, the version counts one key each is brought to (with RotateKey) and measured at; the
    # first is the baseline every ratio is taken to. () skips the scenario.
    aging_versions: tuple[tuple[str, tuple[int, ...]], ...] = ()
    aging_rotations: int = 50  # RotateKey calls per closed loop, sequential and at 8 in flight
    aging_restarts: int = 3  # server restarts, each giving one cold Encrypt per aged key
    # key_count: per backend, the numbers of keys in one tenant at which CreateKey/s and a ListKeys page are
    # measured. () skips the scenario.
    key_counts: tuple[tuple[str, tuple[int, ...]], ...] = ()


# Seeding is by RotateKey, now the same cost at any age: 10,000 versions take about 30 s on the embedded store and
# about 8 minutes on MongoDB + Redis (SecantusDB rotates at ~20/s), so key_aging takes about 10 minutes in all.
# (Before per-version tags a rotation read every version: 3,000 took 128 s embedded, 10,000 would have taken ~20
# minutes.) Any counts: `python -m bench --only key_aging --aging-versions embedded=10,1000,10000`.
FULL_AGING_VERSIONS = (("embedded", (10, 1_000, 10_000)), ("mongo_redis", (10, 1_000, 10_000)))
# CreateKey on SecantusDB runs at about 60/s: 100,000 keys would take half an hour, so MongoDB + Redis stops at 10,000.
FULL_KEY_COUNTS = (("embedded", (1_000, 10_000, 100_000)), ("mongo_redis", (1_000, 10_000)))
FULL = Phases(
    3,
    6000,
    1500,
    1000,
    1000,
    (16, 256),
    300,
    (1, 16, 64),
    aging_versions=FULL_AGING_VERSIONS,
    key_counts=FULL_KEY_COUNTS,
)
# The quick run leaves key_aging out (even these counts cost about 9 s, and bench-quick must stay under a minute);
# they are what `python -m bench --quick --only key_aging` measures.
QUICK = Phases(
    3,
    800,
    250,
    100,
    100,
    (16, 32),
    40,
    (16,),
    against_history=False,
    aging_versions=(("embedded", (10, 300)),),
    aging_rotations=20,
    aging_restarts=2,
)


def summary(values: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": [round(v, 4) for v in values],
    }


def repeat(times: int, measure: Callable[[], float]) -> dict[str, Any]:
    return summary([measure() for _ in range(times)])


class Backends:
    """Starts the servers a backend needs, once per benchmark run."""

    def __init__(self, scratch: Path) -> None:
        self._scratch = scratch
        self._mongo: MongoServer | None = None
        self._redis: RedisServer | None = None
        self._hsm: SoftHsm | None = None
        self.root_key = base64.b64encode(os.urandom(32)).decode()

    def env(self, backend: str, name: str) -> dict[str, str]:
        """Environment for `backend`: "embedded", "embedded_redis" or "mongo_redis"."""
        env = {
            "CRYPTO_ROOT_KEY": self.root_key,
            "CRYPTO_DATA_DIR": str(self._scratch / f"data-{name}"),
            "CRYPTO_WORKERS": "16",
        }
        if backend.endswith("_redis"):
            if self._redis is None:
                self._redis = RedisServer(self._scratch / "redis")
                self._redis.start()
            env["REDIS_URL"] = self._redis.url
        if backend.startswith("mongo"):
            if self._mongo is None:
                self._mongo = MongoServer(self._scratch / "mongo")
                self._mongo.start()
            env.update(MONGODB_URI=self._mongo.uri, MONGODB_DATABASE=f"bench_{name}")
        return env

    def root_env(self, root: str, name: str) -> dict[str, str] | None:
        """The embedded store with the root key from a variable ("file") or a SoftHSM2 token ("hsm"); None when
        SoftHSM2 is not installed."""
        env = self.env("embedded", name)
        if root == "file":
            return env
        library = find_softhsm_library()
        if library is None:
            return None
        if self._hsm is None:
            self._hsm = SoftHsm.create(self._scratch / "softhsm", library)
            self._hsm.init_key(SoftHsm.ROOT_LABEL)
        del env["CRYPTO_ROOT_KEY"]
        return {**env, **self._hsm.env()}

    def stop(self) -> None:
        for server in (self._mongo, self._redis):
            if server is not None:
                server.stop()


@contextmanager
def bench_server(env: dict[str, str], *, processes: int = 1) -> Iterator[list[CryptoServerProcess]]:
    """The crypto server with the echo baseline, in `processes` worker processes sharing one port under one
    supervisor (CRYPTO_PROCESSES); the list holds the one process started."""
    env = {**env, "CRYPTO_PROCESSES": str(processes)}
    servers = [CryptoServerProcess.launch(env, module="bench.echo_server")]
    try:
        yield servers
    finally:
        for server in servers:
            server.terminate()


def _prepared_requests(address: str) -> tuple[str, bytes, bytes]:
    """A warm key, and serialized Encrypt / Decrypt requests for 1 KiB that the server answers OK."""
    with CryptoClient(address, TENANT) as client:
        key = client.create_key(KeyType.DATA)
        plaintext = os.urandom(KIB)
        sealed = client.encrypt(key.key_id, plaintext).ciphertext
        assert client.decrypt(sealed).plaintext == plaintext  # h2load cannot check grpc-status: we do, once
    encrypt = crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=key.key_id, plaintext=plaintext).SerializeToString()
    decrypt = crypto_pb.DecryptRequest(tenant_id=TENANT, ciphertext=sealed).SerializeToString()
    return key.key_id, encrypt, decrypt


def aesgcm_baseline(phases: Phases) -> dict[str, Any]:
    """Raw cryptography AESGCM of 1 KiB in this process: what the crypto itself costs."""
    aead = AESGCM(AESGCM.generate_key(256))
    plaintext = os.urandom(KIB)
    nonce = os.urandom(12)

    def measure() -> float:
        count = 50_000
        started = time.perf_counter()
        for _ in range(count):
            aead.encrypt(nonce, plaintext, b"")
        return count / (time.perf_counter() - started)

    ops = repeat(phases.repetitions, measure)
    return {"ops_per_s": ops, "us_per_op": 1e6 / ops["median"]}


def unary(address: str, phases: Phases, in_flight_levels: tuple[int, ...]) -> dict[str, Any]:
    """Scenario 1/2: Encrypt and Decrypt of 1 KiB vs the empty RPC, at each in-flight level (h2load); and the
    floor of an Encrypt on the same server (bench/echo_server.py's Seal: the same request parsed and sealed, the
    same answer, nothing else), so the run shows how near the empty call an Encrypt could come at all."""
    _, encrypt, decrypt = _prepared_requests(address)
    calls = {
        "empty": (ECHO_METHOD, b""),
        "floor": (SEAL_METHOD, encrypt),
        "encrypt": (ENCRYPT, encrypt),
        "decrypt": (DECRYPT, decrypt),
    }
    results: dict[str, Any] = {}
    for in_flight in in_flight_levels:
        requests = phases.single_requests if in_flight == 1 else phases.unary_requests
        level: dict[str, Any] = {}
        runs: dict[str, list[h2load.LoadResult]] = {name: [] for name in calls}
        for _ in range(phases.repetitions):
            for name, (method, message) in calls.items():  # interleaved, so drift hits all alike
                runs[name].append(h2load.run(address, method, message, requests=requests, in_flight=in_flight))
        for name, measured in runs.items():
            if any(r.failed for r in measured):
                raise RuntimeError(f"{name} at {in_flight} in flight had failed requests")
            level[name] = {
                "rps": summary([r.rps for r in measured]),
                "p50_ms": summary([r.p50_ms for r in measured]),
                "p99_ms": summary([r.p99_ms for r in measured]),
            }
        for name in ("floor", "encrypt", "decrypt"):
            level[name]["rps_ratio_to_empty"] = level[name]["rps"]["median"] / level["empty"]["rps"]["median"]
            level[name]["p50_ratio_to_empty"] = level[name]["p50_ms"]["median"] / level["empty"]["p50_ms"]["median"]
            level[name]["p99_ratio_to_empty"] = level[name]["p99_ms"]["median"] / level["empty"]["p99_ms"]["median"]
        # What is ours: the service's own work on top of the floor.
        level["encrypt"]["rps_ratio_to_floor"] = level["encrypt"]["rps"]["median"] / level["floor"]["rps"]["median"]
        results[str(in_flight)] = level
    return results


def python_cross_check(address: str, phases: Phases) -> dict[str, Any]:
    """Scenario 1 at 16 in flight with a Python client instead of h2load (it costs the shared CPU more)."""
    _, encrypt, _ = _prepared_requests(address)
    empty = [pyload.run(address, ECHO_METHOD, b"", requests=phases.unary_requests, in_flight=16).rps]
    sealed = [pyload.run(address, ENCRYPT, encrypt, requests=phases.unary_requests, in_flight=16).rps]
    for _ in range(phases.repetitions - 1):
        empty.append(pyload.run(address, ECHO_METHOD, b"", requests=phases.unary_requests, in_flight=16).rps)
        sealed.append(pyload.run(address, ENCRYPT, encrypt, requests=phases.unary_requests, in_flight=16).rps)
    return {
        "empty_rps": summary(empty),
        "encrypt_rps": summary(sealed),
        "ratio": statistics.median(sealed) / statistics.median(empty),
    }


CREATE_KEY = "/caas.crypto.v1.KeyService/CreateKey"
GET_KEY = "/caas.crypto.v1.KeyService/GetKey"
LIST_KEYS = "/caas.crypto.v1.KeyService/ListKeys"
ROTATE_KEY = "/caas.crypto.v1.KeyService/RotateKey"
AGING_TENANT = "bench-aging"
COUNT_TENANT = "bench-count"
LIST_PAGE_SIZE = 100


def _raw_call(method: str, message: bytes | Message) -> Callable[[grpc.aio.Channel], Any]:
    """One call of `method` with a request (serialized here if it is a message), for pyload.run_calls."""
    if isinstance(message, Message):
        message = message.SerializeToString()

    async def call(channel: grpc.aio.Channel) -> object:
        stub: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            method, request_serializer=None, response_deserializer=None
        )
        return await stub(message, timeout=60)

    return call


def cold_path(address: str, phases: Phases) -> dict[str, Any]:
    """Scenario 3: the first Encrypt with each of many new keys (store read + unwrap), keys per second."""

    def measure() -> float:
        with CryptoClient(address, TENANT) as client:
            key_ids = [client.create_key().key_id for _ in range(phases.cold_keys)]

        return pyload.run_calls(_first_encrypts([(TENANT, k) for k in key_ids]), address, in_flight=16)

    return {"keys_per_s": repeat(phases.repetitions, measure), "keys_per_run": phases.cold_keys}


def _first_encrypts(tenants: list[tuple[str, str]]) -> list[Callable[[grpc.aio.Channel], Any]]:
    return [
        _raw_call(ENCRYPT, crypto_pb.EncryptRequest(tenant_id=tenant, key_id=key_id, plaintext=b"first use"))
        for tenant, key_id in tenants
    ]


def cold_tenants(backends: Backends, phases: Phases) -> dict[str, Any]:
    """Scenario 3b: after a restart, the first Encrypt with a key of each of many tenants (each needs its master
    key unwrapped under the root key), with the root key from a file and in an HSM (SoftHSM2); then the same
    calls again, warm. keys/s, and the HSM's figure as a ratio to the file's."""
    results: dict[str, Any] = {}
    for root in ("file", "hsm"):
        env = backends.root_env(root, f"cold-tenants-{root}")
        if env is None:
            results[root] = {"skipped": "SoftHSM2 is not installed (apt-get install softhsm2)"}
            continue
        with bench_server(env) as (server,), grpc.insecure_channel(server.address) as channel:
            keys = key_service_pb2_grpc.KeyServiceStub(channel)
            tenants = [
                (
                    tenant,
                    keys.CreateKey(
                        key_pb.CreateKeyRequest(tenant_id=tenant, key_type=resources_pb2.KEY_TYPE_DATA)
                    ).key.key_id,
                )
                for tenant in (f"cold-{n}" for n in range(phases.cold_tenants))
            ]
        cold: list[float] = []
        warm: list[float] = []
        for _ in range(phases.repetitions):
            with bench_server(env) as (server,):  # a restart: nothing unwrapped in memory
                cold.append(pyload.run_calls(_first_encrypts(tenants), server.address, in_flight=16))
                warm.append(pyload.run_calls(_first_encrypts(tenants), server.address, in_flight=16))
        results[root] = {"cold_keys_per_s": summary(cold), "warm_keys_per_s": summary(warm), "tenants": len(tenants)}
    if "cold_keys_per_s" in results["hsm"]:
        for phase in ("cold", "warm"):
            results[f"hsm_to_file_{phase}_ratio"] = (
                results["hsm"][f"{phase}_keys_per_s"]["median"] / results["file"][f"{phase}_keys_per_s"]["median"]
            )
    return results


def key_management(address: str, phases: Phases) -> dict[str, Any]:
    """Scenario 6: CreateKey and RotateKey per second (8 in flight)."""
    create = key_pb.CreateKeyRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_DATA)

    def creates() -> float:
        return pyload.run_calls([_raw_call(CREATE_KEY, create)] * phases.key_management_ops, address, in_flight=8)

    def rotations() -> float:
        with CryptoClient(address, TENANT) as client:
            key_ids = [client.create_key().key_id for _ in range(8)]
        requests = [
            key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key_ids[i % 8]) for i in range(phases.key_management_ops)
        ]
        return pyload.run_calls([_raw_call(ROTATE_KEY, r) for r in requests], address, in_flight=8)

    return {
        "create_per_s": repeat(phases.repetitions, creates),
        "rotate_per_s": repeat(phases.repetitions, rotations),
    }


def _timed_calls(channel: grpc.Channel, method: str, message: bytes, times: int) -> tuple[list[float], bytes]:
    """`times` sequential calls: each one's latency in ms, and the last response's bytes."""
    stub: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        method, request_serializer=None, response_deserializer=None
    )
    latencies = []
    response = b""
    for _ in range(times):
        started = time.perf_counter()
        response = stub(message, timeout=60)
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies, response


def _aged_key(keys: key_service_pb2_grpc.KeyServiceStub, versions: int) -> str:
    """A new data key brought to `versions` versions with RotateKey, one call at a time."""
    key = keys.CreateKey(key_pb.CreateKeyRequest(tenant_id=AGING_TENANT, key_type=resources_pb2.KEY_TYPE_DATA)).key
    for _ in range(versions - 1):
        key = keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=AGING_TENANT, key_id=key.key_id), timeout=60).key
    if key.primary_version != versions:
        raise RuntimeError(f"seeding reached version {key.primary_version}, not {versions}")
    return key.key_id


def key_aging(backends: Backends, phases: Phases) -> dict[str, Any]:
    """Issue 17, target 6: what a key's age costs. On each backend, one key per count in `phases.aging_versions`
    brought to that many versions with RotateKey (not measured), then at each count: GetKey (median of 50 calls,
    response bytes), a cold Encrypt (the key's first Encrypt after a server restart, the tenant's master key
    already unwrapped by an Encrypt with another key; median over `aging_restarts` restarts), and RotateKey/s in a
    closed loop of `aging_rotations` calls, sequential, then at 8 in flight. Each figure also as a ratio to the
    first (smallest) count's: time per call, so the target (issue 17) is <= 1.5 for each."""
    results: dict[str, Any] = {"rotations_per_run": phases.aging_rotations, "restarts": phases.aging_restarts}
    for backend, counts in phases.aging_versions:
        results[backend] = _key_aging_on(backends.env(backend, f"aging-{backend}"), counts, phases)
    return results


def _key_aging_on(env: dict[str, str], counts: tuple[int, ...], phases: Phases) -> dict[str, Any]:
    figures: dict[str, dict[str, Any]] = {str(count): {"versions": count} for count in counts}
    with bench_server(env) as (server,), grpc.insecure_channel(server.address) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        warm_key = _aged_key(keys, 1)
        aged: dict[int, str] = {}
        for count in counts:
            started = time.perf_counter()
            aged[count] = _aged_key(keys, count)
            figures[str(count)]["seed_s"] = time.perf_counter() - started
        for count, key_id in aged.items():
            get = key_pb.GetKeyRequest(tenant_id=AGING_TENANT, key_id=key_id).SerializeToString()
            latencies, response = _timed_calls(channel, GET_KEY, get, 50)
            figures[str(count)].update(get_key_ms=summary(latencies), get_key_bytes=len(response))
    cold: dict[int, list[float]] = {count: [] for count in counts}
    for restart in range(phases.aging_restarts):
        with bench_server(env) as (server,), grpc.insecure_channel(server.address) as channel:  # nothing in memory
            _timed_calls(channel, ENCRYPT, _encrypt_request(warm_key), 1)  # the connection and the master key
            # Every other restart in reverse order, so whatever the first call after the warm one still pays is
            # shared between counts.
            for count, key_id in sorted(aged.items(), reverse=restart % 2 == 1):
                cold[count].extend(_timed_calls(channel, ENCRYPT, _encrypt_request(key_id), 1)[0])
            if restart == phases.aging_restarts - 1:
                for count, key_id in aged.items():
                    figures[str(count)].update(
                        _rotations(server.address, keys_at=count, aged_key=key_id, phases=phases)
                    )
    for count in counts:
        figures[str(count)]["cold_encrypt_ms"] = summary(cold[count])
    baseline, largest = figures[str(counts[0])], figures[str(counts[-1])]
    results: dict[str, Any] = {
        **figures,
        "baseline_versions": counts[0],
        "largest_versions": counts[-1],
        "largest_to_baseline": {
            "rotate_ms": largest["rotate_ms"] / baseline["rotate_ms"],
            "rotate_ms_8_in_flight": (
                largest["rotate_ms_8_in_flight"] / baseline["rotate_ms_8_in_flight"]
                if largest["rotate_ms_8_in_flight"] and baseline["rotate_ms_8_in_flight"]
                else None
            ),
            "get_key_ms": largest["get_key_ms"]["median"] / baseline["get_key_ms"]["median"],
            "get_key_bytes": largest["get_key_bytes"] / baseline["get_key_bytes"],
            "cold_encrypt_ms": largest["cold_encrypt_ms"]["median"] / baseline["cold_encrypt_ms"]["median"],
        },
    }
    return results


def _encrypt_request(key_id: str) -> bytes:
    return crypto_pb.EncryptRequest(tenant_id=AGING_TENANT, key_id=key_id, plaintext=b"aged").SerializeToString()


def _rotations(address: str, *, keys_at: int, aged_key: str, phases: Phases) -> dict[str, Any]:
    """RotateKey/s on a key at `keys_at` versions, sequential and at 8 in flight. The loops add versions: a count
    no larger than one loop is cheap to seed, so each loop there gets a fresh key; a larger one continues the aged
    key, whose count the two loops raise by 2 x `aging_rotations` (10 % at 1,000)."""
    rotations = phases.aging_rotations
    figures: dict[str, Any] = {}
    with grpc.insecure_channel(address) as channel:
        keys = key_service_pb2_grpc.KeyServiceStub(channel)
        for in_flight, suffix in ((1, ""), (8, "_8_in_flight")):
            key_id = _aged_key(keys, keys_at) if keys_at <= rotations else aged_key
            first = keys.GetKey(key_pb.GetKeyRequest(tenant_id=AGING_TENANT, key_id=key_id)).key.primary_version
            rotate = key_pb.RotateKeyRequest(tenant_id=AGING_TENANT, key_id=key_id).SerializeToString()
            figures[f"rotate_versions{suffix}"] = [first, first + rotations]
            try:
                per_s = pyload.run_calls([_raw_call(ROTATE_KEY, rotate)] * rotations, address, in_flight=in_flight)
            except grpc.aio.AioRpcError as error:
                if in_flight == 1:
                    raise
                # Not a target: 8 rotations at once on one old key on SecantusDB can take minutes each (docs/
                # performance.md, "Key aging"); the figure is then missing, not the whole run.
                figures[f"rotate_per_s{suffix}"] = figures[f"rotate_ms{suffix}"] = None
                figures[f"rotate_error{suffix}"] = error.code().name
                continue
            figures[f"rotate_per_s{suffix}"] = per_s
            figures[f"rotate_ms{suffix}"] = 1000 / per_s
    return figures


def key_count(backends: Backends, phases: Phases) -> dict[str, Any]:
    """Issue 17, target 6: what the number of keys in a tenant costs. On each backend, one tenant filled with
    CreateKey (16 in flight) up to each count in `phases.key_counts`; at each: CreateKey/s over the last
    min(1,000, count) keys created, and the latency of one ListKeys page of 100 (median of 20), the first page and
    one 90 % deep in the list, reached by walking the page tokens (that walk's pages/s too)."""
    results: dict[str, Any] = {"page_size": LIST_PAGE_SIZE}
    for backend, counts in phases.key_counts:
        figures: dict[str, Any] = {}
        with bench_server(backends.env(backend, f"count-{backend}")) as (server,):
            address = server.address
            create = _raw_call(
                CREATE_KEY,
                key_pb.CreateKeyRequest(
                    tenant_id=COUNT_TENANT, key_type=resources_pb2.KEY_TYPE_DATA
                ).SerializeToString(),
            )
            created = 0
            for count in counts:
                sample = min(1_000, count - created)
                started = time.perf_counter()
                if count - sample > created:
                    pyload.run_calls([create] * (count - sample - created), address, in_flight=16)
                create_per_s = pyload.run_calls([create] * sample, address, in_flight=16)
                fill_s = time.perf_counter() - started
                created = count
                figures[str(count)] = {
                    "create_per_s": create_per_s,
                    "fill_s": fill_s,
                    **_list_pages(address, count),
                }
        results[backend] = figures
    return results


def _list_pages(address: str, keys: int) -> dict[str, Any]:
    first = key_pb.ListKeysRequest(tenant_id=COUNT_TENANT, page_size=LIST_PAGE_SIZE)
    with grpc.insecure_channel(address) as channel:
        stub = key_service_pb2_grpc.KeyServiceStub(channel)
        deep_at = int(keys * 0.9) // LIST_PAGE_SIZE
        deep_token = ""
        started = time.perf_counter()
        page, pages = stub.ListKeys(first, timeout=60), 1
        while page.next_page_token:
            if pages == deep_at:
                deep_token = page.next_page_token
            page = stub.ListKeys(
                key_pb.ListKeysRequest(
                    tenant_id=COUNT_TENANT, page_size=LIST_PAGE_SIZE, page_token=page.next_page_token
                ),
                timeout=60,
            )
            pages += 1
        walk_s = time.perf_counter() - started
        if pages * LIST_PAGE_SIZE < keys:
            raise RuntimeError(f"ListKeys walked {pages} pages of {LIST_PAGE_SIZE}, fewer than {keys} keys")
        deep = (
            first
            if not deep_token
            else key_pb.ListKeysRequest(tenant_id=COUNT_TENANT, page_size=LIST_PAGE_SIZE, page_token=deep_token)
        )
        first_ms, _ = _timed_calls(channel, LIST_KEYS, first.SerializeToString(), 20)
        deep_ms, _ = _timed_calls(channel, LIST_KEYS, deep.SerializeToString(), 20)
    return {
        "list_first_page_ms": summary(first_ms),
        "list_deep_page_ms": summary(deep_ms),
        "list_deep_page_index": deep_at,
        "list_walk_pages_per_s": pages / walk_s,
    }


def large_data(servers: list[CryptoServerProcess], phases: Phases, scratch: Path) -> dict[str, Any]:
    """Scenario 4: large data through the client's streaming calls (1 MiB chunks) vs the echo stream, interleaved:
    EncryptStream and DecryptStream (chunks from memory, output counted and dropped) and FileCipher (file to file
    in `scratch`, both ways); MB/s, ratios to the echo stream, the server's CPU per MiB, its peak RSS."""
    (server,) = servers
    with CryptoClient(server.address, TENANT) as client:
        key_id = client.create_key().key_id
        results: dict[str, Any] = {"rss_mib_at_start": server.peak_rss_bytes() / MIB}
        for size_mib in phases.large_sizes_mib:
            streams = _LargeStreams(server, client, key_id, size_mib, scratch)
            try:
                results[f"{size_mib}MiB"] = streams.measure(phases.repetitions)
            finally:
                streams.remove_files()
    small, large = (results[f"{size}MiB"]["server_peak_rss_mib"] for size in phases.large_sizes_mib)
    results["rss_growth_mib"] = large - small
    return results


class _LargeStreams:
    """Scenario 4 at one size: a plaintext file of `size_mib`, its ciphertext (on disk and as chunks in memory)."""

    def __init__(self, server: CryptoServerProcess, client: CryptoClient, key_id: str, size_mib: int, scratch: Path):
        self.server, self.client, self.key_id, self.size_mib = server, client, key_id, size_mib
        self.files = FileCipher(client, key_id)
        self.chunk = os.urandom(MIB)
        self.plain, self.sealed, self.opened = (scratch / f"{name}-{size_mib}" for name in ("plain", "sealed", "out"))
        with self.plain.open("wb") as writer:
            for _ in range(size_mib):
                writer.write(self.chunk)
        self.files.encrypt_file(self.plain, self.sealed)
        with self.sealed.open("rb") as reader:
            self.sealed_chunks = list(iter(lambda: reader.read(MIB), b""))

    def echo(self) -> None:
        _echo_stream(self.server.address, self.chunk, self.size_mib)

    def encrypt(self) -> None:
        sealed = self.client.encrypt_stream(self.key_id, (self.chunk for _ in range(self.size_mib)))
        assert sum(len(c) for c in sealed) > self.size_mib * MIB

    def decrypt(self) -> None:
        opened = self.client.decrypt_stream(iter(self.sealed_chunks), key_id=self.key_id)
        assert sum(len(c) for c in opened) == self.size_mib * MIB

    def encrypt_file(self) -> None:
        self.files.encrypt_file(self.plain, self.sealed)

    def decrypt_file(self) -> None:
        assert self.files.decrypt_file(self.sealed, self.opened) == self.size_mib * MIB

    def measure(self, repetitions: int) -> dict[str, Any]:
        calls = {
            "echo": self.echo,
            "encrypt": self.encrypt,
            "decrypt": self.decrypt,
            "encrypt_file": self.encrypt_file,
            "decrypt_file": self.decrypt_file,
        }
        mb_s: dict[str, list[float]] = {name: [] for name in calls}
        server_ms_per_mib: dict[str, list[float]] = {name: [] for name in calls}
        pid = self.server.process.pid
        for _ in range(repetitions):
            for name, call in calls.items():  # interleaved, so drift hits all alike
                cpu_before = cpu_seconds_of_tree(pid)
                started = time.perf_counter()
                call()
                mb_s[name].append(self.size_mib * MIB / (time.perf_counter() - started) / 1e6)
                server_ms_per_mib[name].append((cpu_seconds_of_tree(pid) - cpu_before) * 1000 / self.size_mib)
        echo = statistics.median(mb_s["echo"])
        figures: dict[str, Any] = {}
        for name in calls:
            figures[f"{name}_mb_s"] = summary(mb_s[name])
            figures[f"{name}_server_ms_per_mib"] = summary(server_ms_per_mib[name])
            if name != "echo":
                figures[f"{name}_ratio_to_echo"] = statistics.median(mb_s[name]) / echo
        figures["ratio_to_echo"] = figures["encrypt_ratio_to_echo"]
        figures["server_peak_rss_mib"] = self.server.peak_rss_bytes() / MIB
        return figures

    def remove_files(self) -> None:
        for path in (self.plain, self.sealed, self.opened):
            path.unlink(missing_ok=True)


def _echo_stream(address: str, chunk: bytes, size_mib: int) -> None:
    with grpc.insecure_channel(address) as channel:
        echo: grpc.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            ECHO_STREAM_METHOD, request_serializer=None, response_deserializer=None
        )
        received = sum(len(c) for c in echo(chunk for _ in range(size_mib)))
        assert received == size_mib * MIB


def scale_out(backends: Backends, phases: Phases) -> dict[str, Any]:
    """Scenario 5: CRYPTO_PROCESSES=1 vs 2 (workers sharing the port with SO_REUSEPORT under one supervisor),
    h2load over 8 connections. The embedded store, no Redis: the workers learn each other's key changes from the
    store (the change poller)."""
    results: dict[str, Any] = {}
    for processes in (1, 2):
        with bench_server(backends.env("embedded", f"scale{processes}"), processes=processes) as servers:
            address = servers[0].address
            _, encrypt, _ = _prepared_requests(address)
            rps = [
                h2load.run(address, ENCRYPT, encrypt, requests=phases.unary_requests, in_flight=64, connections=8).rps
                for _ in range(phases.repetitions)
            ]
            results[f"{processes}_process"] = {"encrypt_rps": summary(rps)}
    results["ratio"] = results["2_process"]["encrypt_rps"]["median"] / results["1_process"]["encrypt_rps"]["median"]
    return results


AUDIT_MODES = ("none", "denied_only", "all")


def audit_cost(backends: Backends, phases: Phases) -> dict[str, Any]:
    """Scenario 6: Encrypt of 1 KiB at 16 in flight with CRYPTO_AUDIT_CRYPTO none, denied_only and all (a
    record per call, queued, batched by the writer): rps and p99 as ratios to none. Embedded store (file sink)."""
    runs: dict[str, list[h2load.LoadResult]] = {mode: [] for mode in AUDIT_MODES}
    with contextlib.ExitStack() as stack:
        requests = {}
        for mode in AUDIT_MODES:
            env = {**backends.env("embedded", f"audit-{mode}"), "CRYPTO_AUDIT_CRYPTO": mode}
            address = stack.enter_context(bench_server(env))[0].address
            requests[mode] = (address, _prepared_requests(address)[1])
        for _ in range(phases.repetitions):
            for mode, (address, encrypt) in requests.items():  # interleaved, so drift hits all alike
                runs[mode].append(h2load.run(address, ENCRYPT, encrypt, requests=phases.unary_requests, in_flight=16))
    results: dict[str, Any] = {}
    for mode, measured in runs.items():
        if any(r.failed for r in measured):
            raise RuntimeError(f"encrypt with audit {mode} had failed requests")
        results[mode] = {"rps": summary([r.rps for r in measured]), "p99_ms": summary([r.p99_ms for r in measured])}
    for mode in ("denied_only", "all"):
        results[f"{mode}_rps_ratio_to_none"] = results[mode]["rps"]["median"] / results["none"]["rps"]["median"]
        results[f"{mode}_p99_ratio_to_none"] = results[mode]["p99_ms"]["median"] / results["none"]["p99_ms"]["median"]
    return results


# CRYPTO_ACCESS_LOG's modes. Every measured call succeeds, so `errors` writes no line at all: the floor, what the
# server costs without an access log (CRYPTO_LOG_LEVEL=WARNING would also hide the "serving" line the bench waits for).
ACCESS_LOG_VARIANTS = {
    "all": {"CRYPTO_ACCESS_LOG": "all"},
    "sampled:100": {"CRYPTO_ACCESS_LOG": "sampled:100"},
    "errors": {"CRYPTO_ACCESS_LOG": "errors"},
}


def access_log_cost(backends: Backends, phases: Phases) -> dict[str, Any]:
    """Encrypt of 1 KiB at 16 and 64 in flight and the empty call, on one server per CRYPTO_ACCESS_LOG mode, runs
    interleaved: rps, Encrypt ÷ empty on each server (the ratio of each
    repetition's pair of runs, median, min and max), and each mode's Encrypt rps ÷ `all`'s. Embedded store."""
    results: dict[str, Any] = {"variants": {name: env for name, env in ACCESS_LOG_VARIANTS.items()}}
    load_generator_cpu: list[float] = []
    with contextlib.ExitStack() as stack:
        prepared = {}
        for name, extra in ACCESS_LOG_VARIANTS.items():
            env = {**backends.env("embedded", f"access-log-{name.replace(':', '-')}"), **extra}
            address = stack.enter_context(bench_server(env))[0].address
            prepared[name] = (address, _prepared_requests(address)[1])
        for in_flight in (16, 64):
            runs: dict[str, dict[str, list[float]]] = {name: {"encrypt": [], "empty": []} for name in prepared}
            for _ in range(phases.repetitions):
                for name, (address, encrypt) in prepared.items():  # interleaved, so drift hits all alike
                    for call, (method, message) in (("encrypt", (ENCRYPT, encrypt)), ("empty", (ECHO_METHOD, b""))):
                        measured = h2load.run(
                            address, method, message, requests=phases.unary_requests, in_flight=in_flight
                        )
                        if measured.failed:
                            raise RuntimeError(f"{call} with access log {name} had failed requests")
                        runs[name][call].append(measured.rps)
                        load_generator_cpu.append(measured.load_generator_cpu)
            level: dict[str, Any] = {}
            for name, calls in runs.items():
                level[name] = {call: summary(values) for call, values in calls.items()}
                level[name]["encrypt_to_empty"] = summary(
                    [encrypt / empty for encrypt, empty in zip(calls["encrypt"], calls["empty"], strict=True)]
                )
                level[name]["encrypt_rps_ratio_to_all"] = summary(
                    [mine / every for mine, every in zip(calls["encrypt"], runs["all"]["encrypt"], strict=True)]
                )
            results[str(in_flight)] = level
    results["load_generator_cpu"] = summary(load_generator_cpu)
    return results


def security_cost(backends: Backends, phases: Phases, scratch: Path) -> dict[str, Any]:
    """Scenario 7: Encrypt of 1 KiB at 16 in flight, Python client on one long-lived channel, on a server with
    mTLS + an access policy + audit `denied_only`, as a ratio to the same server without any of them (plaintext,
    no policy, audit `none`). The TLS handshake is paid once per channel, as by a real service."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    client_cert = ca.issue_cert("client.bench", common_name="bench-client")
    files = {}
    for name, blob in (
        ("ca.pem", ca.cert_pem),
        ("server.pem", server_cert.cert_chain_pems[0]),
        ("server.key", server_cert.private_key_pem),
        ("client.pem", client_cert.cert_chain_pems[0]),
        ("client.key", client_cert.private_key_pem),
    ):
        blob.write_to_path(str(scratch / name))
        files[name] = scratch / name
    policy = scratch / "policy.json"
    policy.write_text(
        json.dumps(
            {
                "version": 1,
                "rules": [
                    {
                        "principals": ["bench-client"],
                        "tenants": [TENANT],
                        "permissions": ["encrypt", "decrypt", "manage_keys", "read_keys"],
                    }
                ],
            }
        )
    )
    secured_env = {
        "CRYPTO_TLS_CERT_FILE": str(files["server.pem"]),
        "CRYPTO_TLS_KEY_FILE": str(files["server.key"]),
        "CRYPTO_TLS_CLIENT_CA_FILE": str(files["ca.pem"]),
        "CRYPTO_POLICY_FILE": str(policy),
        "CRYPTO_AUDIT_CRYPTO": "denied_only",
    }
    credentials = grpc.ssl_channel_credentials(
        root_certificates=files["ca.pem"].read_bytes(),
        private_key=files["client.key"].read_bytes(),
        certificate_chain=files["client.pem"].read_bytes(),
    )
    modes = {
        "plain": ({**backends.env("embedded", "security-plain"), "CRYPTO_AUDIT_CRYPTO": "none"}, None),
        "mtls_policy_audit": ({**backends.env("embedded", "security-on"), **secured_env}, credentials),
    }
    runs: dict[str, list[h2load.LoadResult]] = {mode: [] for mode in modes}
    with contextlib.ExitStack() as stack:
        prepared = {}
        for mode, (env, creds) in modes.items():
            address = stack.enter_context(bench_server(env))[0].address
            config = ClientConfig(credentials=creds) if creds is not None else ClientConfig()
            with CryptoClient(address, TENANT, config) as client:
                key_id = client.create_key(KeyType.DATA).key_id
                client.encrypt(key_id, b"warm")
            request = crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=key_id, plaintext=os.urandom(KIB))
            prepared[mode] = (address, request.SerializeToString(), creds)
        for _ in range(phases.repetitions):
            for mode, (address, encrypt, creds) in prepared.items():  # interleaved, so drift hits both alike
                runs[mode].append(
                    pyload.run(
                        address, ENCRYPT, encrypt, requests=phases.unary_requests, in_flight=16, credentials=creds
                    )
                )
    results: dict[str, Any] = {}
    for mode, measured in runs.items():
        if any(r.failed for r in measured):
            raise RuntimeError(f"encrypt ({mode}) had failed requests")
        results[mode] = {"rps": summary([r.rps for r in measured]), "p99_ms": summary([r.p99_ms for r in measured])}
    results["rps_ratio"] = results["mtls_policy_audit"]["rps"]["median"] / results["plain"]["rps"]["median"]
    results["p99_ratio"] = results["mtls_policy_audit"]["p99_ms"]["median"] / results["plain"]["p99_ms"]["median"]
    return results


# The last commit before issue 13 (automatic rotation, usage budget per key version): the lifecycle scenario's
# baseline, run from its own source tree in the same run as today's server.
BEFORE_LIFECYCLE = "461a99f0a7fd13ddd40bdcfb53684f038270aa86"


def _source_tree_at(commit: str, directory: Path) -> Path | None:
    """The repository's files at `commit`, extracted under `directory`; None without git history (a shallow or
    exported copy), in which case the scenario is skipped and says why."""
    repository = Path(__file__).resolve().parent.parent
    archive = subprocess.run(
        ["git", "-C", str(repository), "archive", "--format=tar", commit], capture_output=True, check=False
    )
    if archive.returncode != 0:
        return None
    directory.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(directory)], input=archive.stdout, check=True)
    return directory


def lifecycle_cost(backends: Backends, phases: Phases, scratch: Path) -> dict[str, Any]:
    """Encrypt of 1 KiB at 16 and 64 in flight on today's server (usage counting, rotator) and on the server as it
    was before issue 13, each on its own embedded store, runs interleaved: rps ratios, raw and each normalised by
    its own server's empty call. The old server runs from an extracted tree (PYTHONSAFEPATH keeps the working
    directory off its import path, PYTHONPATH puts the old tree first)."""
    old_tree = _source_tree_at(BEFORE_LIFECYCLE, scratch / "before-lifecycle")
    if old_tree is None:
        return {"skipped": f"no git history with {BEFORE_LIFECYCLE[:12]} (shallow clone?)"}
    variants = {
        "before": {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(old_tree)},
        "now": {},
    }
    results: dict[str, Any] = {"baseline_commit": BEFORE_LIFECYCLE}
    with contextlib.ExitStack() as stack:
        prepared = {}
        for name, extra in variants.items():
            env = {**backends.env("embedded", f"lifecycle-{name}"), **extra}
            address = stack.enter_context(bench_server(env))[0].address
            prepared[name] = (address, _prepared_requests(address)[1])
        for in_flight in (16, 64):
            runs: dict[str, dict[str, list[float]]] = {name: {"encrypt": [], "empty": []} for name in variants}
            for _ in range(phases.repetitions):
                for name, (address, encrypt) in prepared.items():  # interleaved, so drift hits both alike
                    for call, (method, message) in {"encrypt": (ENCRYPT, encrypt), "empty": (ECHO_METHOD, b"")}.items():
                        measured = h2load.run(
                            address, method, message, requests=phases.unary_requests, in_flight=in_flight
                        )
                        if measured.failed:
                            raise RuntimeError(f"{call} on the {name} server had failed requests")
                        runs[name][call].append(measured.rps)
            level: dict[str, Any] = {
                name: {call: summary(values) for call, values in calls.items()} for name, calls in runs.items()
            }
            now, before = level["now"], level["before"]
            level["encrypt_rps_ratio_now_to_before"] = now["encrypt"]["median"] / before["encrypt"]["median"]
            level["encrypt_to_empty_now_to_before"] = (now["encrypt"]["median"] / now["empty"]["median"]) / (
                before["encrypt"]["median"] / before["empty"]["median"]
            )
            results[str(in_flight)] = level
    return results


def _prepared_batches(address: str) -> tuple[bytes, bytes, bytes]:
    """Serialized Encrypt of 1 KiB, and BatchEncrypt / BatchDecrypt of BATCH_ITEMS x 1 KiB with one key, each
    answered OK with every item succeeding (checked once: h2load sees neither grpc-status nor item errors)."""
    key_id, encrypt, _ = _prepared_requests(address)
    plaintexts = [os.urandom(KIB) for _ in range(BATCH_ITEMS)]
    batch_encrypt = crypto_pb.BatchEncryptRequest(
        tenant_id=TENANT, items=[crypto_pb.BatchEncryptRequest.Item(key_id=key_id, plaintext=p) for p in plaintexts]
    )
    with grpc.insecure_channel(address) as channel:
        call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            BATCH_ENCRYPT, request_serializer=None, response_deserializer=None
        )
        sealed = crypto_pb.BatchEncryptResponse.FromString(call(batch_encrypt.SerializeToString(), timeout=30))
        batch_decrypt = crypto_pb.BatchDecryptRequest(
            tenant_id=TENANT,
            items=[crypto_pb.BatchDecryptRequest.Item(ciphertext=r.ciphertext) for r in sealed.results],
        )
        open_call: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            BATCH_DECRYPT, request_serializer=None, response_deserializer=None
        )
        opened = crypto_pb.BatchDecryptResponse.FromString(open_call(batch_decrypt.SerializeToString(), timeout=30))
    if [r.plaintext for r in opened.results] != plaintexts:
        raise RuntimeError("the prepared batch did not round-trip: " + str(opened.results[0].error))
    return encrypt, batch_encrypt.SerializeToString(), batch_decrypt.SerializeToString()


# The last commit before the batch path took one key lookup and one budget reservation per key (issue 17,
# target 3): the batch scenario's baseline, run from its own source tree in the same run as today's server.
BEFORE_BATCHES = "9073821f4a74602ed211e1db53a650993f07f1eb"


def batch_cost(backends: Backends, phases: Phases, scratch: Path) -> dict[str, Any]:
    """BatchEncrypt and BatchDecrypt of BATCH_ITEMS x 1 KiB (one key) at 16 and 64 calls in flight (h2load), runs
    interleaved with unary Encrypt of 1 KiB on the same server: items/s (calls/s x BATCH_ITEMS) and the ratio to
    Encrypt's calls/s. Today's server and, when git history has it, the server before the batch path was reworked
    (BEFORE_BATCHES, from an extracted tree as in `lifecycle_cost`), each on its own embedded store."""
    variants: dict[str, dict[str, str]] = {"now": {}}
    old_tree = _source_tree_at(BEFORE_BATCHES, scratch / "before-batches")
    if old_tree is not None:
        variants = {"before": {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(old_tree)}, **variants}
    calls = ("encrypt", "batch_encrypt", "batch_decrypt")
    methods = dict(zip(calls, (ENCRYPT, BATCH_ENCRYPT, BATCH_DECRYPT), strict=True))
    # A batch call costs about 4 Encrypts here (h2load, 1 KiB items): a quarter as many calls take a similar time.
    batch_calls = max(200, phases.unary_requests // 4)
    results: dict[str, Any] = {"items_per_batch": BATCH_ITEMS, "baseline_commit": BEFORE_BATCHES}
    if old_tree is None:
        results["before"] = {"skipped": f"no git history with {BEFORE_BATCHES[:12]} (shallow clone?)"}
    with contextlib.ExitStack() as stack:
        prepared = {}
        for name, extra in variants.items():
            env = {**backends.env("embedded", f"batches-{name}"), **extra}
            address = stack.enter_context(bench_server(env))[0].address
            prepared[name] = (address, dict(zip(calls, _prepared_batches(address), strict=True)))
        for in_flight in (16, 64):
            runs: dict[str, dict[str, list[float]]] = {name: {call: [] for call in calls} for name in variants}
            for _ in range(phases.repetitions):
                for name, (address, messages) in prepared.items():  # interleaved, so drift hits all alike
                    for call in calls:
                        requests = phases.unary_requests if call == "encrypt" else batch_calls
                        measured = h2load.run(
                            address, methods[call], messages[call], requests=requests, in_flight=in_flight
                        )
                        if measured.failed:
                            raise RuntimeError(f"{call} on the {name} server had failed requests")
                        runs[name][call].append(measured.rps * (1 if call == "encrypt" else BATCH_ITEMS))
            level: dict[str, Any] = {}
            for name, measured_calls in runs.items():
                figures: dict[str, Any] = {"encrypt_rps": summary(measured_calls["encrypt"])}
                for call in ("batch_encrypt", "batch_decrypt"):
                    figures[f"{call}_items_per_s"] = summary(measured_calls[call])
                    figures[f"{call}_ratio_to_encrypt"] = (
                        figures[f"{call}_items_per_s"]["median"] / figures["encrypt_rps"]["median"]
                    )
                level[name] = figures
            if "before" in level:
                for call in ("batch_encrypt", "batch_decrypt"):
                    level[f"{call}_items_now_to_before"] = (
                        level["now"][f"{call}_items_per_s"]["median"] / level["before"][f"{call}_items_per_s"]["median"]
                    )
            results[str(in_flight)] = level
    return results


def with_scratch() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="caas-bench-")


@contextmanager
def in_memory_files(fallback: Path) -> Iterator[Path]:
    """A directory in tmpfs (/dev/shm) when there is one, else `fallback`: FileCipher's figures should measure the
    client and the server, not how fast this machine's disk takes a file."""
    shared_memory = Path("/dev/shm")
    if not shared_memory.is_dir() or not os.access(shared_memory, os.W_OK):
        yield fallback
        return
    with tempfile.TemporaryDirectory(prefix="caas-bench-", dir=shared_memory) as directory:
        yield Path(directory)
