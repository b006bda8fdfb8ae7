"""The key store stalls, fills up or turns read-only; the service keeps its promises (issue 10, defects 5 and 8).

- A frozen MongoDB (SIGSTOP) under a storm of key-management calls: store-bound calls fail UNAVAILABLE fast,
  cached Encrypt/Decrypt and health keep answering, and everything recovers without a restart.
- The embedded store on a full disk (a small tmpfs) and on read-only files: KeyService health says so, and
  the store's connections recover by themselves once the disk is writable again.
- The embedded store on a full ext4 disk, its write-ahead log holding blocks it reuses (issue 22, item 4): health
  turns NOT_SERVING within one health interval, with writes refused and reads working.
- The embedded store's `-shm` file made read-only (issue 22, item 5): writes refused, reads working, the process
  alive (it used to die of SIGBUS), and a clean exit if stopped meanwhile.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.storage.sqlite import SqliteKeyStore
from tests.conftest import Launch, error_info
from tests.reliability.conftest import Replica, StartReplicas
from tests.servers import MongoServer
from tests.waiting import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
KEY_SERVICE = "caas.crypto.v1.KeyService"


def _health(replica: Replica, service: str = "", timeout_s: float = 1.0) -> int:
    stub = health_pb2_grpc.HealthStub(replica.channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s).status


def _create(replica: Replica, timeout_s: float = 10.0) -> str:
    request = key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)
    return replica.keys.CreateKey(request, timeout=timeout_s).key.key_id


def test_a_frozen_database_costs_key_management_milliseconds_and_crypto_nothing(
    start_replicas: StartReplicas, own_mongo: MongoServer
) -> None:
    (replica,) = start_replicas(1, CRYPTO_HEALTH_INTERVAL="0.5")
    key_id = _create(replica)
    sealed = replica.encrypt(key_id).ciphertext
    stop = threading.Event()
    create_outcomes: list[tuple[str, float]] = []
    crypto_failures: list[str] = []
    crypto_pairs = 0
    health_failures: list[str] = []

    def create_storm() -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                _create(replica)
                outcome = "OK"
            except grpc.RpcError as error:
                outcome = error.code().name
            create_outcomes.append((outcome, time.monotonic() - started))

    def crypto_load() -> None:
        nonlocal crypto_pairs
        while not stop.is_set():
            try:
                replica.encrypt(key_id)
                replica.crypto.Decrypt(crypto_pb.DecryptRequest(tenant_id="acme", ciphertext=sealed), timeout=5)
                crypto_pairs += 1
            except grpc.RpcError as error:
                crypto_failures.append(error.code().name)

    def health_probe() -> None:
        while not stop.is_set():
            try:
                _health(replica, timeout_s=1.0)  # Kubernetes' default probe timeout
            except grpc.RpcError as error:
                health_failures.append(error.code().name)
            stop.wait(0.1)  # a probe's period, as Kubernetes probes the real server process

    with own_mongo.frozen(), ThreadPoolExecutor(20) as pool:
        workers = [pool.submit(create_storm) for _ in range(16)]
        workers += [pool.submit(crypto_load) for _ in range(2)]
        workers.append(pool.submit(health_probe))
        time.sleep(8)  # the real MongoDB process stays frozen this long: longer than the store timeout (5 s)
        stop.set()
        for worker in workers:
            worker.result()

    assert not health_failures, f"health must answer whatever the load: {Counter(health_failures)}"
    assert not crypto_failures, f"cached keys keep working: {Counter(crypto_failures)}"
    assert crypto_pairs >= 200, f"cached Encrypt/Decrypt kept their pace ({crypto_pairs} pairs in 8 s)"
    codes = Counter(code for code, _ in create_outcomes)
    assert set(codes) == {"UNAVAILABLE"}, f"UNAVAILABLE, never DEADLINE_EXCEEDED: {codes}"
    late = sorted(took for _, took in create_outcomes[len(create_outcomes) // 2 :])
    assert late[len(late) // 2] < 1.0, "once the store is known down, calls fail long before the 5 s store timeout"
    # Recovery without a restart.
    eventually(
        lambda: _health(replica, KEY_SERVICE) == SERVING, timeout_s=15.0, what="KeyService SERVING", interval_s=0.1
    )
    # A caller's retry (UNAVAILABLE is retriable) succeeds within moments: the first write after the outage
    # may still meet a connection the outage broke.
    eventually(lambda: _attempt(replica) == "OK", timeout_s=10.0, what="a key created", interval_s=0.2)


@pytest.fixture
def small_disk() -> Iterator[Path]:
    """A 4 MiB tmpfs to fill up (a real ENOSPC)."""
    mount_point = Path(tempfile.mkdtemp(prefix="caas-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)
    mount_point.rmdir()


def _fill(directory: Path) -> Path:
    """A file that takes every free block (a real ENOSPC): large writes, then ever smaller ones for the rest."""
    filler = directory / "filler"
    with filler.open("wb", buffering=0) as out:
        for chunk in (1 << 20, 65536, 4096, 512):
            with contextlib.suppress(OSError):
                while True:
                    out.write(b"\0" * chunk)
        with contextlib.suppress(OSError):
            os.fsync(out.fileno())
    return filler


def _embedded_replica(launch: Launch, data_dir: Path, health_interval: str = "0.2", **extra: str) -> Replica:
    env = {
        "CRYPTO_DATA_DIR": str(data_dir),
        "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
        "CRYPTO_HEALTH_INTERVAL": health_interval,
        **extra,
    }
    return Replica(launch(**env))


def test_a_full_disk_shows_in_health_and_writes_recover_when_space_returns(launch: Launch, small_disk: Path) -> None:
    replica = _embedded_replica(launch, small_disk / "data")
    key_id = _create(replica)
    # Its first encryption reserves a block of uses (one store write): the usage budget's bound is exact, so
    # encryptions without reserved uses wait for a writable store.
    assert replica.encrypt(key_id).key_version == 1
    unused_key_id = _create(replica)
    filler = _fill(small_disk)
    try:
        eventually(
            lambda: _health(replica, KEY_SERVICE) == NOT_SERVING,
            timeout_s=5.0,
            what="KeyService NOT_SERVING",
            interval_s=0.05,
        )
        assert _health(replica) == SERVING, "the server as a whole stays in the balancer: cached keys work"
        assert replica.encrypt(key_id).key_version == 1
        with pytest.raises(grpc.RpcError) as refused:
            _create(replica)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as unreserved:
            replica.encrypt(unused_key_id)
        assert unreserved.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        filler.unlink()
    eventually(
        lambda: _health(replica, KEY_SERVICE) == SERVING, timeout_s=5.0, what="KeyService SERVING", interval_s=0.05
    )
    with ThreadPoolExecutor(8) as pool:
        created = list(pool.map(lambda _: _attempt(replica), range(48)))
    assert Counter(created) == {"OK": 48}, replica.process.lines[-80:]
    replica.process.terminate()


@pytest.fixture
def ext4_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MiB ext4 file system on a loop device, to fill up: a real disk's allocation (SQLite's files keep blocks
    they once used, ext4 keeps a journal), which a tmpfs does not have."""
    image, mount_point = tmp_path / "disk.img", tmp_path / "disk"
    mount_point.mkdir()
    with image.open("wb") as out:
        out.truncate(20 << 20)
    for command in (["mkfs.ext4", "-q", str(image)], ["mount", "-o", "loop", str(image), str(mount_point)]):
        try:
            done = subprocess.run(command, capture_output=True, check=False)
        except FileNotFoundError:
            pytest.skip(f"{command[0]} is not installed: the test needs a loop-mounted ext4 file system")
        if done.returncode != 0:
            pytest.skip(
                f"cannot make a loop-mounted ext4 file system here (`{' '.join(command)}` needs root and a loop "
                f"device): {done.stderr.decode().strip()}"
            )
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


# The embedded store's health probe runs every CRYPTO_HEALTH_INTERVAL (default 2 s): KeyService health must turn
# NOT_SERVING within one interval of the disk filling up, and back within one interval of space returning (plus
# the probe itself, and slack for a shared 2-core machine).
HEALTH_INTERVAL_S = 2.0
HEALTH_BOUND_S = HEALTH_INTERVAL_S + 1.5
# SQLite checkpoints its write-ahead log once it holds 1000 pages, then writes it again from the start.
WAL_CHECKPOINT_BYTES = 1000 * (4096 + 24)


@pytest.mark.parametrize("audit_elsewhere", [False, True], ids=["audit-on-the-disk", "audit-elsewhere"])
def test_a_full_ext4_disk_turns_key_service_not_serving_within_the_health_interval(
    launch: Launch, ext4_disk: Path, tmp_path: Path, audit_elsewhere: bool
) -> None:
    """Issue 22, item 4: the probe rewrote one small row, which fit in blocks SQLite's write-ahead log already
    held, so KeyService said SERVING for 8 s and more while every CreateKey and RotateKey was refused.

    With the audit trail in the data directory (the default) a key change is refused for its audit record,
    written first; with the audit trail elsewhere, by the store itself."""
    data_dir = ext4_disk / "data"
    env = {"CRYPTO_AUDIT_FILE": str(tmp_path / "audit.jsonl")} if audit_elsewhere else {}
    replica = _embedded_replica(launch, data_dir, health_interval=str(HEALTH_INTERVAL_S), **env)
    key_id = _create(replica)
    sealed = replica.encrypt(key_id).ciphertext
    # History, as on a server that has run a while: past a checkpoint, so that the log is written again from its
    # start, into blocks it already holds.
    wal = data_dir / (SqliteKeyStore.FILE_NAME + "-wal")
    while wal.stat().st_size < WAL_CHECKPOINT_BYTES:
        _create(replica)
    for _ in range(5):
        _create(replica)
    assert _health(replica, KEY_SERVICE) == SERVING
    filler = _fill(ext4_disk)
    filled_at = time.monotonic()
    try:
        eventually(
            lambda: _health(replica, KEY_SERVICE) == NOT_SERVING,
            timeout_s=HEALTH_BOUND_S,
            what=f"KeyService NOT_SERVING within {HEALTH_BOUND_S} s of the disk filling up",
            interval_s=0.05,
        )
        took = time.monotonic() - filled_at
        reasons = {"ERROR_REASON_STORE_UNAVAILABLE"}
        if not audit_elsewhere:
            reasons.add("ERROR_REASON_AUDIT_UNAVAILABLE")
        for call in (
            lambda: _create(replica),
            lambda: replica.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="acme", key_id=key_id), timeout=10),
        ):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
            assert error_info(refused.value).reason in reasons, refused.value.details()
        # Reads and keys in memory keep working.
        assert (
            replica.keys.GetKey(key_pb.GetKeyRequest(tenant_id="acme", key_id=key_id), timeout=5).key.key_id == key_id
        )
        opened = replica.crypto.Decrypt(crypto_pb.DecryptRequest(tenant_id="acme", ciphertext=sealed), timeout=5)
        assert opened.plaintext == b"x"
        # For as long as the disk is full, not only at the first probe.
        samples = []
        for _ in range(12):
            samples.append(_health(replica, KEY_SERVICE))
            time.sleep(HEALTH_INTERVAL_S / 4)
        assert set(samples) == {NOT_SERVING}, samples
    finally:
        filler.unlink()
    freed_at = time.monotonic()
    eventually(
        lambda: _health(replica, KEY_SERVICE) == SERVING,
        timeout_s=HEALTH_BOUND_S,
        what=f"KeyService SERVING within {HEALTH_BOUND_S} s of space returning",
        interval_s=0.05,
    )
    back = time.monotonic() - freed_at
    assert _attempt(replica) == "OK", replica.process.lines[-40:]
    print(f"NOT_SERVING {took:.2f} s after the disk filled; SERVING {back:.2f} s after space returned")
    assert replica.process.terminate() == 0


def _set_immutable(paths: list[Path], on: bool) -> None:
    """chattr +i: even root cannot open the files for writing (file modes do not bind root), so a connection
    opened meanwhile is read-only, as on a read-only volume."""
    done = subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr is not available here: {done.stderr.decode().strip()}")


def test_connections_opened_while_the_store_was_read_only_recover_by_themselves(launch: Launch, tmp_path: Path) -> None:
    data_dir = tmp_path / "ro-data"
    replica = _embedded_replica(launch, data_dir)
    _create(replica)
    # Not the -shm file, which SQLite maps into memory: the tests above make it read-only on its own.
    files = [data_dir, *(data_dir / (SqliteKeyStore.FILE_NAME + suffix) for suffix in ("", "-wal"))]
    _set_immutable(files, True)
    try:
        eventually(
            lambda: _health(replica, KEY_SERVICE) == NOT_SERVING,
            timeout_s=5.0,
            what="KeyService NOT_SERVING",
            interval_s=0.05,
        )
        # Many calls at once: worker threads that had no connection yet open one now, read-only.
        with ThreadPoolExecutor(16) as pool:
            during = list(pool.map(lambda _: _attempt(replica), range(48)))
        assert "UNAVAILABLE" in during
    finally:
        _set_immutable(files, False)
    eventually(
        lambda: _health(replica, KEY_SERVICE) == SERVING, timeout_s=5.0, what="KeyService SERVING", interval_s=0.05
    )
    # As many at once as the store takes (CRYPTO_STORE_CONCURRENCY: half the workers): none may fail.
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda _: _attempt(replica), range(48)))
    assert Counter(after) == {"OK": 48}, f"no connection stays read-only: {replica.process.lines[-60:]}"


def test_a_read_only_shared_memory_file_refuses_writes_and_the_server_lives_on(launch: Launch, tmp_path: Path) -> None:
    """Issue 22, item 5: SQLite maps the `-shm` file (the write-ahead log's index) into memory; made read-only
    (here immutable: file modes do not bind root), the next write into that memory killed the server with SIGBUS
    (exit -7). Now the store refuses writes, reads go on, and writes work again once the file is writable."""
    data_dir = tmp_path / "shm-data"
    replica = _embedded_replica(launch, data_dir, health_interval=str(HEALTH_INTERVAL_S))
    key_ids = [_create(replica) for _ in range(3)]
    sealed = replica.encrypt(key_ids[0]).ciphertext
    shm = data_dir / (SqliteKeyStore.FILE_NAME + "-shm")
    assert shm.exists()

    def get(key_id: str) -> str:
        request = key_pb.GetKeyRequest(tenant_id="acme", key_id=key_id)
        return str(replica.keys.GetKey(request, timeout=5).key.key_id)

    def alive() -> bool:
        exit_code = replica.process.process.poll()
        assert exit_code is None, f"the server exited ({exit_code}): {replica.process.lines[-20:]}"
        return True

    _set_immutable([shm], True)
    try:
        eventually(
            lambda: alive() and _health(replica, KEY_SERVICE) == NOT_SERVING,
            timeout_s=HEALTH_BOUND_S,
            what="KeyService NOT_SERVING",
            interval_s=0.05,
        )
        assert [get(key_id) for key_id in key_ids] == key_ids
        opened = replica.crypto.Decrypt(crypto_pb.DecryptRequest(tenant_id="acme", ciphertext=sealed), timeout=5)
        assert opened.plaintext == b"x"
        with pytest.raises(grpc.RpcError) as refused:
            _create(replica)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert error_info(refused.value).reason == "ERROR_REASON_STORE_UNAVAILABLE", refused.value.details()
        # Many calls at once, on worker threads that may have no connection yet; reads among them.
        with ThreadPoolExecutor(16) as pool:
            during = list(pool.map(lambda _: _attempt(replica), range(32)))
            read = list(pool.map(get, key_ids * 8))
        assert Counter(during) == {"UNAVAILABLE": 32}
        assert read == key_ids * 8
        time.sleep(2 * HEALTH_INTERVAL_S)  # background writers (health probe, usage counts) have had their turn
        assert alive() and _health(replica, KEY_SERVICE) == NOT_SERVING
    finally:
        _set_immutable([shm], False)
    eventually(
        lambda: _health(replica, KEY_SERVICE) == SERVING,
        timeout_s=HEALTH_BOUND_S,
        what="KeyService SERVING",
        interval_s=0.05,
    )
    with ThreadPoolExecutor(8) as pool:
        after = list(pool.map(lambda _: _attempt(replica), range(48)))
    assert Counter(after) == {"OK": 48}, replica.process.lines[-40:]
    assert [get(key_id) for key_id in key_ids] == key_ids
    assert replica.process.terminate() == 0


def test_a_server_stopped_while_the_shared_memory_file_is_read_only_exits_cleanly(
    launch: Launch, tmp_path: Path
) -> None:
    """Closing SQLite's last connection checkpoints the log, which writes into the -shm file: SIGBUS on the way out
    (exit -7). The store leaves its connections to the process's exit instead; SQLite recovers the log next time."""
    data_dir = tmp_path / "shm-data"
    root_key = base64.b64encode(os.urandom(32)).decode()
    replica = _embedded_replica(launch, data_dir, str(HEALTH_INTERVAL_S), CRYPTO_ROOT_KEY=root_key)
    key_id = _create(replica)
    shm = data_dir / (SqliteKeyStore.FILE_NAME + "-shm")
    _set_immutable([shm], True)
    try:
        eventually(
            lambda: _health(replica, KEY_SERVICE) == NOT_SERVING,
            timeout_s=HEALTH_BOUND_S,
            what="KeyService NOT_SERVING",
            interval_s=0.05,
        )
        assert replica.process.terminate() == 0, replica.process.lines[-20:]
    finally:
        _set_immutable([shm], False)
    again = _embedded_replica(launch, data_dir, CRYPTO_ROOT_KEY=root_key)
    assert again.keys.GetKey(key_pb.GetKeyRequest(tenant_id="acme", key_id=key_id), timeout=5).key.key_id == key_id
    assert _attempt(again) == "OK"


def _attempt(replica: Replica) -> str:
    try:
        _create(replica)
    except grpc.RpcError as error:
        return error.code().name
    return "OK"
