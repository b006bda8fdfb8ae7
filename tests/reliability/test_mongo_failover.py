"""What a MongoDB fail-over looks like to the service, against real processes (issue 22 item 8).

No replica set runs here, but what a fail-over does to the driver can be reproduced: SecantusDB started with
`--enable-test-commands` answers chosen commands as a replica set's primary does while it steps down or shuts
down (NotWritablePrimary 10107, InterruptedDueToReplStateChange 11602, ShutdownInProgress 91), drops the
connection instead of answering, or holds a command past the caller's timeout and then applies it (a write whose
outcome the caller cannot know). Each fault is armed on each kind of round trip the service makes:

| call | round trip | command |
|---|---|---|
| CreateKey | the key's insert | `insert` (key store client) |
| RotateKey | the compare-and-set that makes the new version primary | `update` |
| Encrypt with a key not used yet | the usage reservation | `findAndModify` |
| (background, every flush interval) | the give-back of an idle version's unused uses | `update` (a pipeline) |
| CreateKey | the audit trail's intent record | `insert` (audit sink client) |
| ListKeys; (background) the change poller | a read of the keys | `find` |

The promises (docs/reliability.md): a caller gets UNAVAILABLE with a RetryInfo, never INTERNAL or UNKNOWN;
nothing half-written is reported done (a retried CreateKey gives one key, a retried RotateKey contiguous
versions, stored usage counts never fall below the uses made); the service recovers by itself within
RECOVERY_BOUND_S of the fault's end; and a single such error — a fail-over the driver's own retry rides out —
costs the call moments, not the ~10 s of failures it cost before (defect 12 in docs/reliability.md).

One database server and one service process for the whole module; each test uses its own tenant.
"""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.storage.mongo_client import AUDIT_APP_NAME, STORE_APP_NAME
from tests.conftest import error_info
from tests.reliability.conftest import Replica
from tests.servers import CryptoServerProcess, MongoServer
from tests.waiting import eventually

_T = TypeVar("_T")

STORE_TIMEOUT_S = 1.0  # CRYPTO_STORE_TIMEOUT of the service under test: a blocked command outlasts it
HEALTH_INTERVAL_S = 0.5
USAGE_FLUSH_INTERVAL_S = 0.5
INVALIDATION_INTERVAL_S = 0.25  # how often the change poller reads
BLOCK_MS = 1500
# From the fault's end to the first call that succeeds: the circuit's wait (1 s) and the driver's next look at
# the server (minHeartbeatFrequencyMS, 0.5 s), with room for a loaded machine. Measured: docs/reliability.md.
RECOVERY_BOUND_S = 3.0
USAGE_BLOCK = 4096  # CRYPTO_KEY_USAGE_FLUSH_EVERY's default: the uses one reservation takes

STORE_UNAVAILABLE = "ERROR_REASON_STORE_UNAVAILABLE"
AUDIT_UNAVAILABLE = "ERROR_REASON_AUDIT_UNAVAILABLE"

# What a fail-over does to a command, as `MongoServer.fail_point` arguments.
FAULTS: dict[str, dict[str, Any]] = {
    "NotWritablePrimary": {"error_code": 10107},
    "InterruptedDueToReplStateChange": {"error_code": 11602},
    "ShutdownInProgress": {"error_code": 91},
    "closeConnection": {"close_connection": True},
    "blockConnection": {"block_ms": BLOCK_MS},
}
# The errors a driver's one retry of a write rides out (a blocked command is not retried: its time is up).
SINGLE_ERRORS = ["NotWritablePrimary", "InterruptedDueToReplStateChange", "ShutdownInProgress", "closeConnection"]

# Every recovery measured in this module, by test, and the health transitions: the figures docs/reliability.md
# quotes (printed at the end of the module, with -s).
RECOVERIES: dict[str, float] = {}
HEALTH: dict[str, float] = {}


@pytest.fixture(scope="module")
def failover_mongo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MongoServer]:
    server = MongoServer(tmp_path_factory.mktemp("failover") / "mongo", test_commands=True)
    server.start()
    yield server
    server.discard()


@pytest.fixture(scope="module")
def database_name() -> str:
    return f"failover{os.getpid()}_{time.monotonic_ns()}"


@pytest.fixture(scope="module")
def service(
    failover_mongo: MongoServer, database_name: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replica]:
    process = CryptoServerProcess.launch(
        {
            "MONGODB_URI": failover_mongo.uri,
            "MONGODB_DATABASE": database_name,
            "CRYPTO_ROOT_KEY": base64.b64encode(os.urandom(32)).decode(),
            "CRYPTO_DATA_DIR": str(tmp_path_factory.mktemp("failover-service")),
            "CRYPTO_STORE_TIMEOUT": str(STORE_TIMEOUT_S),
            "CRYPTO_HEALTH_INTERVAL": str(HEALTH_INTERVAL_S),
            "CRYPTO_KEY_USAGE_FLUSH_INTERVAL": str(USAGE_FLUSH_INTERVAL_S),
            "CRYPTO_INVALIDATION_INTERVAL": str(INVALIDATION_INTERVAL_S),
        }
    )
    replica = Replica(process)
    yield replica
    replica.close()
    process.kill()
    if RECOVERIES:
        worst = max(RECOVERIES, key=RECOVERIES.__getitem__)
        print(f"\nrecoveries: max {RECOVERIES[worst]:.2f} s ({worst}); {RECOVERIES}; health: {HEALTH}")


@pytest.fixture(autouse=True)
def no_fault_left(failover_mongo: MongoServer, service: Replica) -> Iterator[None]:
    """Each test starts and ends with no fail point armed and the store answering."""
    failover_mongo.clear_fail_points()
    eventually(lambda: _succeeds(lambda: _list_keys(service, "probe")), timeout_s=15.0, what="the store answering")
    yield
    failover_mongo.clear_fail_points()


def _succeeds(call: Callable[[], object]) -> bool:
    try:
        call()
    except grpc.RpcError:
        return False
    return True


def _database(mongo: MongoServer, name: str) -> Any:
    return mongo.client()[name]


def _tenant(site: str, fault: str) -> str:
    return f"{site}-{fault}"[:64]


def _create(replica: Replica, tenant: str, request_id: str = "") -> resources_pb2.Key:
    request = key_pb.CreateKeyRequest(tenant_id=tenant, key_type=resources_pb2.KEY_TYPE_DATA, request_id=request_id)
    return replica.keys.CreateKey(request, timeout=10).key


def _list_keys(replica: Replica, tenant: str) -> key_pb.ListKeysResponse:
    """The tenant's data keys (not its master key)."""
    request = key_pb.ListKeysRequest(tenant_id=tenant, key_type=resources_pb2.KEY_TYPE_DATA)
    return replica.keys.ListKeys(request, timeout=10)


def _versions(replica: Replica, tenant: str, key_id: str) -> list[int]:
    request = key_pb.ListKeyVersionsRequest(tenant_id=tenant, key_id=key_id, page_size=1000)
    return [v.version for v in replica.keys.ListKeyVersions(request, timeout=10).versions]


def _retry_delay_s(error: grpc.RpcError) -> float | None:
    status = rpc_status.from_call(error)
    for detail in status.details if status is not None else ():
        retry = error_details_pb2.RetryInfo()
        if detail.Unpack(retry):
            return float(retry.retry_delay.ToNanoseconds()) / 1e9
    return None


def _assert_retriable(error: grpc.RpcError, reason: str) -> None:
    """UNAVAILABLE with ErrorInfo `reason` and a RetryInfo: what a caller can act on (never INTERNAL/UNKNOWN)."""
    assert error.code() == grpc.StatusCode.UNAVAILABLE, f"{error.code()}: {error.details()}"
    assert error_info(error).reason == reason, error.details()
    delay = _retry_delay_s(error)
    assert delay is not None, f"no RetryInfo: {error.details()}"
    assert 0 < delay <= 5.0


def _refused(call: Callable[[], object], reason: str) -> None:
    """`call` fails UNAVAILABLE (`reason`, RetryInfo), within the store timeout and a margin."""
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as caught:
        call()
    _assert_retriable(caught.value, reason)
    assert time.monotonic() - started < STORE_TIMEOUT_S + 2.0, "refused within the store timeout"


def _recovers(mongo: MongoServer, name: str, call: Callable[[], _T], reason: str = STORE_UNAVAILABLE) -> _T:
    """End the fault, then call until `call` succeeds: every failure meanwhile is retriable, and the first
    success comes within RECOVERY_BOUND_S (no restart)."""
    mongo.clear_fail_points()
    ended = time.monotonic()
    while True:
        try:
            result = call()
        except grpc.RpcError as error:
            _assert_retriable(error, reason)
            assert time.monotonic() - ended < RECOVERY_BOUND_S, f"not recovered {RECOVERY_BOUND_S} s after the fault"
            time.sleep(0.05)
            continue
        RECOVERIES[name] = took = time.monotonic() - ended
        assert took < RECOVERY_BOUND_S
        return result


def _landed(fault: str) -> None:
    """Wait until a command the fault blocked has been applied (or failed) on the server: it outlives its caller."""
    if FAULTS[fault].get("block_ms"):
        time.sleep(BLOCK_MS / 1000)


def _log_count(replica: Replica, message: str) -> int:
    return sum(1 for entry in replica.process.logs() if entry.get("msg") == message)


def _stored_encryptions(mongo: MongoServer, database: str, key_id: str, version: int = 1) -> int:
    """The stored count of a key's version: its first is inside the key document, later ones on their own."""
    db = _database(mongo, database)
    if version == 1:
        document = db["keys"].find_one({"_id": key_id})
        assert document is not None
        (first,) = document["versions"]
        return int(first.get("encryptions", 0))
    document = db["key_versions"].find_one({"key_id": key_id, "version": version})
    assert document is not None
    return int(document.get("encryptions", 0))


# -- one error alone: the driver's retry rides it out ------------------------------------------------------------


@pytest.mark.parametrize("fault", SINGLE_ERRORS)
def test_one_failover_error_costs_a_write_moments_not_seconds(
    failover_mongo: MongoServer, service: Replica, fault: str
) -> None:
    """Before: one NotWritablePrimary on a CreateKey's insert made the driver mark the server Unknown and wait
    for its next heartbeat (up to heartbeatFrequencyMS, 10 s, with streaming monitoring): that call and every
    write after it failed for seconds. Now the driver looks again within minHeartbeatFrequencyMS (0.5 s) and
    its retry of the write succeeds: the caller sees nothing but the delay."""
    tenant = _tenant("blip", fault)
    _create(service, tenant)  # the tenant's master key exists: the next CreateKey makes one insert
    failover_mongo.fail_point(["insert"], times=1, app_name=STORE_APP_NAME, **FAULTS[fault])
    started = time.monotonic()
    _create(service, tenant)
    took = time.monotonic() - started
    RECOVERIES[f"one {fault}"] = took
    assert took < 1.5, f"one {fault} cost the call {took:.2f} s"
    for _ in range(5):
        started = time.monotonic()
        _create(service, tenant)
        assert time.monotonic() - started < 0.5, "and the writes after it are not held up"


# -- a fault that lasts: refused with a RetryInfo, then recovery by itself -------------------------------------------


@pytest.mark.parametrize("fault", FAULTS)
def test_create_key_insert(failover_mongo: MongoServer, service: Replica, database_name: str, fault: str) -> None:
    tenant = _tenant("create", fault)
    _create(service, tenant)

    def retried() -> resources_pb2.Key:
        return _create(service, tenant, request_id="create-1")

    failover_mongo.fail_point(["insert"], app_name=STORE_APP_NAME, **FAULTS[fault])
    _refused(retried, STORE_UNAVAILABLE)
    created = _recovers(failover_mongo, f"CreateKey insert, {fault}", retried)
    assert retried().key_id == created.key_id, "the same request id gives the same key"
    _landed(fault)  # a blocked insert lands (or collides) by now
    assert retried().key_id == created.key_id
    assert len(_list_keys(service, tenant).keys) == 2, "one key for the request, however often it was tried"
    document = _database(failover_mongo, database_name)["keys"].find_one({"_id": created.key_id})
    assert document is not None and document["primary_version"] == 1


@pytest.mark.parametrize("fault", FAULTS)
def test_rotate_key_compare_and_set(failover_mongo: MongoServer, service: Replica, fault: str) -> None:
    """The rotation's second write fails: its version is written, not yet primary (half-way). The retry with
    the same request id finishes it; nothing is skipped or doubled."""
    tenant = _tenant("rotate", fault)
    key_id = _create(service, tenant).key_id

    def rotate() -> key_pb.RotateKeyResponse:
        request = key_pb.RotateKeyRequest(tenant_id=tenant, key_id=key_id, request_id="rotate-1")
        return service.keys.RotateKey(request, timeout=10)

    failover_mongo.fail_point(["update"], app_name=STORE_APP_NAME, **FAULTS[fault])
    _refused(rotate, STORE_UNAVAILABLE)
    rotated = _recovers(failover_mongo, f"RotateKey update, {fault}", rotate)
    assert rotated.key.primary_version == 2
    _landed(fault)  # a blocked compare-and-set lands (or matches nothing) by now
    assert rotate().key.primary_version == 2, "a repeat adds nothing"
    assert _versions(service, tenant, key_id) == [1, 2]
    again = service.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=tenant, key_id=key_id), timeout=10)
    assert again.key.primary_version == 3
    assert _versions(service, tenant, key_id) == [1, 2, 3], "versions stay 1..n, each once"
    assert service.encrypt(key_id, tenant).key_version == 3


@pytest.mark.parametrize("fault", FAULTS)
def test_encrypt_usage_reservation(
    failover_mongo: MongoServer, service: Replica, database_name: str, fault: str
) -> None:
    tenant = _tenant("reserve", fault)
    key_id = _create(service, tenant).key_id  # never used: its first Encrypt reserves uses in the store

    def encrypt() -> object:
        return service.encrypt(key_id, tenant)

    failover_mongo.fail_point(["findAndModify"], app_name=STORE_APP_NAME, **FAULTS[fault])
    _refused(encrypt, STORE_UNAVAILABLE)
    _recovers(failover_mongo, f"Encrypt reservation, {fault}", encrypt)
    for _ in range(9):
        encrypt()
    _landed(fault)
    stored = _stored_encryptions(failover_mongo, database_name, key_id)
    assert stored >= 10, f"the stored count ({stored}) never falls below the 10 encryptions made"


@pytest.mark.parametrize("fault", FAULTS)
def test_usage_give_back(failover_mongo: MongoServer, service: Replica, database_name: str, fault: str) -> None:
    """A give-back of the unused uses that fails may have been applied all the same (a blocked one is, after the
    server gave up on it): the server must neither use those uses again nor give them back again. Before, it
    kept them: the stored count fell below the uses made (negative, here)."""
    tenant = _tenant("giveback", fault)
    key_id = _create(service, tenant).key_id
    # Version 2 has a document of its own: the give-back's one update is the one that meets the fault.
    service.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=tenant, key_id=key_id), timeout=10)
    assert service.encrypt(key_id, tenant).key_version == 2  # reserves a block; the one use made is the only one
    assert _stored_encryptions(failover_mongo, database_name, key_id, 2) == USAGE_BLOCK
    skipped = (
        "unused encryption reservations not given back: the key store is unavailable (those it never received "
        "are sent on the next pass)"
    )
    before = _log_count(service, skipped)
    # Armed before the version has been idle for a whole pass: its give-back meets the fault.
    failover_mongo.fail_point(["update"], app_name=STORE_APP_NAME, **FAULTS[fault])
    eventually(lambda: _log_count(service, skipped) > before, timeout_s=10.0, what="a give-back that failed")
    failover_mongo.clear_fail_points()
    _landed(fault)  # a blocked give-back is applied by now
    time.sleep(2 * USAGE_FLUSH_INTERVAL_S)  # and later passes have run
    stored = _stored_encryptions(failover_mongo, database_name, key_id, 2)
    # Applied once (a blocked one lands late) or not at all (an error answered): never twice, never spent.
    assert stored in (1, USAGE_BLOCK), f"stored count {stored}: the 1 use made, or the whole block counted"
    _recovers(failover_mongo, f"give-back, then Encrypt, {fault}", lambda: service.encrypt(key_id, tenant))
    assert _stored_encryptions(failover_mongo, database_name, key_id, 2) >= 2, "a fresh block for the next use"


@pytest.mark.parametrize("fault", FAULTS)
def test_audit_record_insert(failover_mongo: MongoServer, service: Replica, database_name: str, fault: str) -> None:
    """A key change is audited before it is made: when the record cannot be written the change is not made."""
    tenant = _tenant("audit", fault)
    _create(service, tenant)

    def retried() -> resources_pb2.Key:
        return _create(service, tenant, request_id="audited-1")

    failover_mongo.fail_point(["insert"], app_name=AUDIT_APP_NAME, **FAULTS[fault])
    _refused(retried, AUDIT_UNAVAILABLE)
    created = _recovers(failover_mongo, f"audit insert, {fault}", retried, AUDIT_UNAVAILABLE)
    _landed(fault)
    assert retried().key_id == created.key_id
    assert len(_list_keys(service, tenant).keys) == 2
    # The server's audit chain has no gap and no fork: a record reported unwritten that landed is continued from.
    records = _database(failover_mongo, database_name)["audit_log"].find({}, {"chain": 1, "seq": 1})
    by_chain: dict[str, list[int]] = {}
    for record in records:
        by_chain.setdefault(record["chain"], []).append(record["seq"])
    for chain, seqs in by_chain.items():
        assert sorted(seqs) == list(range(len(seqs))), f"chain {chain}: {sorted(seqs)}"


@pytest.mark.parametrize("fault", FAULTS)
def test_reads_and_the_change_poller(failover_mongo: MongoServer, service: Replica, fault: str) -> None:
    tenant = _tenant("find", fault)
    _create(service, tenant)
    failing, back = "cannot read key changes from the store; retrying", "reading key changes from the store again"
    eventually(
        lambda: _log_count(service, failing) == _log_count(service, back), timeout_s=10.0, what="the poller reading"
    )
    failed_before = _log_count(service, failing)
    failover_mongo.fail_point(["find"], app_name=STORE_APP_NAME, **FAULTS[fault])
    # The poller's own read meets the fault first (nothing else reads meanwhile).
    eventually(lambda: _log_count(service, failing) > failed_before, timeout_s=10.0, what="the poller failing")
    _refused(lambda: _list_keys(service, tenant), STORE_UNAVAILABLE)
    listed = _recovers(failover_mongo, f"ListKeys find, {fault}", lambda: _list_keys(service, tenant))
    assert len(listed.keys) == 1
    eventually(lambda: _log_count(service, back) > failed_before, timeout_s=10.0, what="the poller reading again")


# -- KeyService health ---------------------------------------------------------------------------------------------


def _key_service_health(replica: Replica) -> int:
    stub = health_pb2_grpc.HealthStub(replica.channel)
    request = health_pb2.HealthCheckRequest(service="caas.crypto.v1.KeyService")
    return stub.Check(request, timeout=1.0).status


def test_key_service_health_follows_a_frozen_database_within_interval_plus_timeout(
    failover_mongo: MongoServer, service: Replica
) -> None:
    """KeyService turns NOT_SERVING once a health ping fails: the next ping starts up to CRYPTO_HEALTH_INTERVAL
    after the outage begins and fails after CRYPTO_STORE_TIMEOUT (2 s + 5 s by default: the 7-8 s seen)."""
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    eventually(lambda: _key_service_health(service) == serving, timeout_s=10.0, what="KeyService SERVING")
    with failover_mongo.frozen():
        frozen = time.monotonic()
        eventually(
            lambda: _key_service_health(service) == not_serving,
            timeout_s=HEALTH_INTERVAL_S + STORE_TIMEOUT_S + 5.0,
            interval_s=0.02,
            what="KeyService NOT_SERVING",
        )
        took = time.monotonic() - frozen
    HEALTH["NOT_SERVING after the freeze"] = took
    assert STORE_TIMEOUT_S - 0.1 <= took <= HEALTH_INTERVAL_S + STORE_TIMEOUT_S + 0.5, f"{took:.2f} s"
    thawed = time.monotonic()
    eventually(lambda: _key_service_health(service) == serving, timeout_s=10.0, interval_s=0.02, what="SERVING")
    HEALTH["SERVING after the thaw"] = time.monotonic() - thawed
