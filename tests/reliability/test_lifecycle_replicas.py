"""Issue 13's acceptance on two replicas, as real `python -m crypto_server` processes on one MongoDB and Redis.

- Rotation: a 1 h rotation period and a clock moved 3 h give exactly 3 new versions, made by the lease holder
  alone; when the holder is killed (SIGKILL: it never gives its lease up) the other replica takes over once the
  lease has run out, not before. The replicas share a clock that the test moves (clocked_server.py).
- Budget: with the soft/hard limits at 1000/1200, concurrent encryption on both replicas rotates each version at
  the soft limit, and no version encrypts more than the hard limit itself (every encryption spends a use reserved
  in the store, and no reservation passes the limit: docs/storage.md), counted from the ciphertexts themselves;
  the stored counts equal those tallies once the replicas have stopped cleanly (unused reservations given
  back). Only one of the two processes rotates. A replica killed while it holds a reservation leaves it counted
  as used: the others still stop at the hard limit.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration
from pymongo.database import Database

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain.ciphertext import read_header
from crypto_server.service.key_rotator import LEASE_NAME
from tests.conftest import FakeClock, Launch, StartServer, error_info
from tests.reliability.clocked_server import CLOCK_FILE_VARIABLE, FileClock
from tests.reliability.conftest import Replica
from tests.servers import CryptoServerProcess, MongoServer, RedisServer
from tests.waiting import eventually

TENANT = "acme"
HOUR = timedelta(hours=1)
ROTATED = "key rotated automatically"
REPOSITORY = Path(__file__).resolve().parents[2]


@pytest.fixture
def deployment(mongo_server: MongoServer, redis_server: RedisServer) -> Iterator[tuple[dict[str, str], Database[Any]]]:
    """The settings every replica of one deployment shares (a fresh database), and that database."""
    name = f"lifecycle{os.getpid()}_{time.monotonic_ns()}"
    env = {
        "MONGODB_URI": mongo_server.uri,
        "MONGODB_DATABASE": name,
        "REDIS_URL": redis_server.url,
        "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
    }
    with mongo_server.client() as client:
        yield env, client[name]


def _stored_versions(database: Database[Any], key_id: str) -> dict[int, int]:
    """Version number → `encryptions`, as the database holds them (past Redis and every keyring)."""
    counts = {
        int(v["version"]): int(v.get("encryptions", 0)) for v in database["key_versions"].find({"key_id": key_id})
    }
    key = database["keys"].find_one({"_id": key_id}) or {}
    counts.update((int(v["version"]), int(v.get("encryptions", 0))) for v in key.get("versions", []))
    return counts


def _rotations(replica: Replica, key_id: str) -> list[int]:
    """The versions this replica's rotator made for `key_id`, from its log."""
    return [
        int(str(entry["key_version"]))
        for entry in replica.process.logs()
        if entry.get("msg") == ROTATED and entry.get("key_id") == key_id
    ]


def _holds(seconds: float, check: Callable[[], bool]) -> None:
    """`check` stays true for `seconds` (under a second: a few rotator passes), checked as it goes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check()
        time.sleep(0.05)  # the replicas are real processes whose rotator passes run on real time
    assert check()


# -- rotation ------------------------------------------------------------------------------------------------

ROTATION_INTERVAL_S = 0.1  # real seconds between a replica's rotator passes
LEASE = timedelta(minutes=90)  # on the shared clock: longer than the period, so holding it decides who rotates


@pytest.fixture
def clocked_replicas(
    deployment: tuple[dict[str, str], Database[Any]], tmp_path: Path
) -> Iterator[tuple[FileClock, list[Replica]]]:
    """Two replicas on the clock the test moves; both run rotator passes every ROTATION_INTERVAL_S."""
    env, _ = deployment
    clock = FileClock(tmp_path / "clock")
    clock.set(datetime(2026, 1, 1, tzinfo=UTC))
    env = {
        **env,
        "CRYPTO_DATA_DIR": str(tmp_path / "data"),
        "CRYPTO_ROTATION_INTERVAL": str(ROTATION_INTERVAL_S),
        "CRYPTO_ROTATION_LEASE": str(LEASE.total_seconds()),
        CLOCK_FILE_VARIABLE: str(clock.path),
        "PYTHONPATH": str(REPOSITORY),
    }
    replicas = [Replica(CryptoServerProcess.launch(env, module="tests.reliability.clocked_server")) for _ in range(2)]
    yield clock, replicas
    for replica in replicas:
        replica.close()
        replica.process.kill()


def test_three_hours_give_three_versions_and_the_other_replica_takes_over_when_the_holder_is_killed(
    clocked_replicas: tuple[FileClock, list[Replica]], deployment: tuple[dict[str, str], Database[Any]]
) -> None:
    clock, replicas = clocked_replicas
    _, database = deployment
    hourly = key_pb.CreateKeyRequest(
        tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_DATA, rotation_period=Duration(seconds=3600)
    )
    key = replicas[0].keys.CreateKey(hourly).key
    started = clock.now()

    def versions() -> list[int]:
        return sorted(_stored_versions(database, key.key_id))

    def versions_made(count: int) -> Callable[[], bool]:
        return lambda: len(versions()) == count

    for hour in range(1, 4):
        clock.advance(HOUR)
        eventually(versions_made(1 + hour), timeout_s=5.0, what="the replicas to get there")
        _holds(0.3, versions_made(1 + hour))  # once per period, however many passes
    assert versions() == [1, 2, 3, 4]
    eventually(
        lambda: sum(len(_rotations(replica, key.key_id)) for replica in replicas) == 3,
        timeout_s=5.0,
        what="the replicas to get there",
    )
    # Each version made once, by the one replica holding the lease (whichever took it first).
    made = {index: _rotations(replica, key.key_id) for index, replica in enumerate(replicas)}
    assert sorted(made[0] + made[1]) == [2, 3, 4]
    (holder_index,) = [index for index, rotated in made.items() if rotated]
    holder, survivor = replicas[holder_index], replicas[1 - holder_index]
    lease = database["leases"].find_one({"_id": LEASE_NAME})
    assert lease is not None
    # Renewed on every pass: it runs out LEASE after the holder's last pass, on the shared clock.
    last_renewal = started + 3 * HOUR
    assert lease["expires_at"] == (last_renewal + LEASE).replace(tzinfo=None)

    holder.process.kill()  # SIGKILL: no clean shutdown, the lease is not given up
    clock.advance(HOUR)  # the key is due again, but the dead replica's lease has 30 minutes left
    _holds(0.5, versions_made(4))
    clock.advance(LEASE - HOUR + timedelta(seconds=1))  # the lease has run out
    eventually(versions_made(5), timeout_s=5.0, what="the replicas to get there")
    # its log line follows the write
    eventually(lambda: _rotations(survivor, key.key_id) == [5], timeout_s=5.0, what="the survivor's rotation log line")
    taken = database["leases"].find_one({"_id": LEASE_NAME})
    assert taken is not None and taken["holder"] != lease["holder"]
    assert survivor.encrypt(key.key_id).key_version == 5

    # The survivor keeps the schedule: one version per period from the rotation it made.
    clock.advance(HOUR)
    eventually(versions_made(6), timeout_s=5.0, what="the replicas to get there")
    _holds(0.3, versions_made(6))
    eventually(lambda: _rotations(survivor, key.key_id) == [5, 6], timeout_s=5.0, what="the replicas to get there")


# -- usage budget --------------------------------------------------------------------------------------------

SOFT_LIMIT = 1000
HARD_LIMIT = 1200
FLUSH_EVERY = 20
REPLICAS = 2
# The soft limit counts reserved uses too: a version is rotated once its used and reserved uses reach it, so it
# has made at least this many (each replica may hold up to FLUSH_EVERY unused when the rotation reaches it).
FEWEST_PER_VERSION = SOFT_LIMIT - REPLICAS * FLUSH_EVERY
# Enough for two rotations whatever each version ends at (between FEWEST_PER_VERSION and HARD_LIMIT), and never
# a third: the last version stays under the soft limit.
ENCRYPTIONS = 2500
WORKERS_PER_REPLICA = 3
EXHAUSTED = "ERROR_REASON_KEY_VERSION_EXHAUSTED"


def test_concurrent_encryption_on_two_replicas_rotates_at_the_soft_limit_and_stays_within_the_budget(
    launch: Launch, deployment: tuple[dict[str, str], Database[Any]]
) -> None:
    env, database = deployment
    replicas = [
        Replica(
            launch(
                **env,
                CRYPTO_KEY_USAGE_SOFT_LIMIT=str(SOFT_LIMIT),
                CRYPTO_KEY_USAGE_HARD_LIMIT=str(HARD_LIMIT),
                CRYPTO_KEY_USAGE_FLUSH_EVERY=str(FLUSH_EVERY),
                CRYPTO_KEY_USAGE_FLUSH_INTERVAL="0.1",
                CRYPTO_ROTATION_INTERVAL="0.2",
                CRYPTO_ROTATION_LEASE="3",
            )
        )
        for _ in range(REPLICAS)
    ]
    # The default rotation period (90 days): only the usage budget rotates this key.
    request = key_pb.CreateKeyRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_DATA)
    key = replicas[0].keys.CreateKey(request).key
    sealed: list[tuple[bytes, bytes, int]] = []  # ciphertext, plaintext, the version Encrypt said it used
    refused: Counter[int] = Counter()  # per replica: KEY_VERSION_EXHAUSTED answers
    lock = threading.Lock()
    enough = threading.Event()  # set too when a worker fails, so that the others stop at once
    deadline = time.monotonic() + 45

    def encrypt(replica_index: int, worker: int) -> None:
        try:
            encrypt_until_enough(replica_index, worker)
        finally:
            enough.set()

    def encrypt_until_enough(replica_index: int, worker: int) -> None:
        replica = replicas[replica_index]
        for n in itertools.count():
            if enough.is_set():
                return
            assert time.monotonic() < deadline, f"only {len(sealed)} encryptions in 45 s; refused: {refused}"
            plaintext = f"{worker}/{n}".encode()
            try:
                reply = replica.crypto.Encrypt(
                    crypto_pb.EncryptRequest(tenant_id=TENANT, key_id=key.key_id, plaintext=plaintext), timeout=10
                )
            except grpc.RpcError as error:
                # The one refusal allowed: the version is spent and this replica has not seen the rotation yet.
                assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error
                assert error_info(error).reason == EXHAUSTED
                with lock:
                    refused[replica_index] += 1
                enough.wait(0.01)  # a moment for the rotation to reach this replica (a real process)
                continue
            with lock:
                sealed.append((reply.ciphertext, plaintext, reply.key_version))
                if len(sealed) >= ENCRYPTIONS:
                    enough.set()

    workers = [(index % REPLICAS, index) for index in range(REPLICAS * WORKERS_PER_REPLICA)]
    with ThreadPoolExecutor(len(workers)) as pool:
        for outcome in [pool.submit(encrypt, index, worker) for index, worker in workers]:
            outcome.result()

    # Tally the versions from the ciphertexts: every one decrypts to its plaintext, and its header names the
    # version Encrypt reported.
    tally: Counter[int] = Counter()
    for start in range(0, len(sealed), 500):
        chunk = sealed[start : start + 500]
        items = [crypto_pb.BatchDecryptRequest.Item(ciphertext=ciphertext) for ciphertext, _, _ in chunk]
        results = (
            replicas[1]
            .crypto.BatchDecrypt(crypto_pb.BatchDecryptRequest(tenant_id=TENANT, items=items), timeout=30)
            .results
        )
        for (ciphertext, plaintext, reported), result in zip(chunk, results, strict=True):
            assert result.plaintext == plaintext and result.key_id == key.key_id
            assert result.key_version == read_header(ciphertext).key_version == reported
            tally[result.key_version] += 1

    assert sorted(tally) == [1, 2, 3], tally
    for version in (1, 2):
        # Rotated at the soft limit, and never past the hard limit: the bound is exact.
        assert FEWEST_PER_VERSION <= tally[version] <= HARD_LIMIT, tally
    assert max(tally.values()) <= HARD_LIMIT, tally
    assert tally[3] < SOFT_LIMIT

    # One rotator for the deployment: one replica made both versions (the lease holder; the lease is live).
    eventually(
        lambda: sum(len(_rotations(replica, key.key_id)) for replica in replicas) == 2,
        timeout_s=5.0,
        what="the replicas to get there",
    )
    made = [_rotations(replica, key.key_id) for replica in replicas]
    assert sorted(made, key=len) == [[], [2, 3]], made
    assert database["leases"].find_one({"_id": LEASE_NAME}) is not None

    # A clean stop gives back every unused reservation: the stored counts are the tallies, nothing lost and
    # nothing twice.
    for replica in replicas:
        replica.close()
        assert replica.process.terminate() == 0
    assert _stored_versions(database, key.key_id) == dict(tally)
    assert database["leases"].find_one({"_id": LEASE_NAME}) is None  # given up at shutdown


@pytest.mark.parametrize("backend", ["mongo+redis"], indirect=True)
def test_the_rotator_rotates_a_key_over_its_soft_limit_whose_cached_copy_has_older_counts(
    start_server: StartServer,
) -> None:
    """The defect the budget test found: the rotator read the key through Redis, whose copy still showed the
    count from when it was cached, so it took the key for not due, rescheduled it 90 days out, and the key was
    never rotated (every flush marked it due again) until the entry expired (CRYPTO_CACHE_TTL, an hour)."""
    clock = FakeClock()
    limits = {"usage_soft_limit": 5, "usage_hard_limit": 100, "usage_flush_every": 3, "usage_flush_interval_s": 0}
    a, b = (start_server(clock=clock, **limits) for _ in range(2))
    key = a.create_key(TENANT)
    for _ in range(5):
        a.encrypt(TENANT, key.key_id, b"x")  # the first one cached the key in Redis, its count at 0
    assert a.running.budget is not None and b.running.rotator is not None
    a.running.budget.flush()  # 5 in the store: at the soft limit, the key is marked due
    assert b.running.rotator.run_once() == 1
    assert b.encrypt(TENANT, key.key_id, b"x").key_version == 2


def test_a_replica_killed_holding_a_reservation_leaves_it_counted_and_the_hard_limit_holds(
    launch: Launch, deployment: tuple[dict[str, str], Database[Any]]
) -> None:
    env, database = deployment
    limits = {
        "CRYPTO_KEY_USAGE_SOFT_LIMIT": "60",
        "CRYPTO_KEY_USAGE_HARD_LIMIT": "60",
        "CRYPTO_KEY_USAGE_FLUSH_EVERY": "20",
        "CRYPTO_ROTATION_INTERVAL": "0",  # nothing rotates: the version is spent for good
    }
    doomed, survivor = (Replica(launch(**env, **limits)) for _ in range(2))
    request = key_pb.CreateKeyRequest(tenant_id=TENANT, key_type=resources_pb2.KEY_TYPE_DATA)
    key = doomed.keys.CreateKey(request).key
    doomed.encrypt(key.key_id, TENANT)  # reserves a block of 20, uses 1
    assert _stored_versions(database, key.key_id) == {1: 20}
    doomed.close()
    doomed.process.kill()  # SIGKILL: its 19 unused uses are never given back

    made = 0
    while True:
        try:
            survivor.encrypt(key.key_id, TENANT)
        except grpc.RpcError as error:
            assert error_info(error).reason == EXHAUSTED
            break
        made += 1
        assert made <= HARD_LIMIT, "runaway: the limit was not enforced"
    assert made == 60 - 20, "everything but the dead replica's block"
    assert 1 + made <= 60
    survivor.close()
    assert survivor.process.terminate() == 0
    assert _stored_versions(database, key.key_id) == {1: 60}, "the lost reservation stays counted as used"
