"""SIGTERM under steady load (issue 10, defect 6): health NOT_SERVING at once, a drain window, then new calls
refused UNAVAILABLE while in-flight calls finish; no caller of the client ever sees a cancelled call, and the
process exits within the drain plus the slowest call."""

from __future__ import annotations

import base64
import os
import signal
import threading
import time
from collections import Counter

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from crypto_client import ClientConfig, CryptoClient
from crypto_client.errors import CryptoClientError, ServiceUnavailableError
from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from tests.conftest import Launch
from tests.reliability.conftest import Replica
from tests.waiting import eventually

DRAIN_S = 1.0


def test_sigterm_under_load_drains_refuses_and_finishes_without_cancelling_anyone(launch: Launch) -> None:
    process = launch(
        CRYPTO_ROOT_KEY=base64.b64encode(os.urandom(32)).decode(),
        CRYPTO_SHUTDOWN_DRAIN=str(DRAIN_S),
        CRYPTO_SHUTDOWN_GRACE="10",
    )
    replica = Replica(process)
    key_id = replica.keys.CreateKey(
        key_pb.CreateKeyRequest(tenant_id="acme", key_type=resources_pb2.KEY_TYPE_DATA)
    ).key.key_id
    stop = threading.Event()
    client_outcomes: Counter[str] = Counter()
    raw_outcomes: Counter[str] = Counter()
    lock = threading.Lock()

    def client_load() -> None:
        with CryptoClient(process.address, "acme", ClientConfig(timeout_s=2.0)) as client:
            while not stop.is_set():
                try:
                    client.encrypt(key_id, b"steady")
                    outcome = "ok"
                except ServiceUnavailableError:
                    outcome = "unavailable"  # the server has gone: the one failure a caller should see
                except CryptoClientError as error:
                    outcome = f"{type(error).__name__}:{error.code.name if error.code else ''}"
                with lock:
                    client_outcomes[outcome] += 1

    def raw_load() -> None:
        request = crypto_pb.EncryptRequest(tenant_id="acme", key_id=key_id, plaintext=b"steady")
        while not stop.is_set():
            try:
                replica.crypto.Encrypt(request, timeout=2)
                outcome = "OK"
            except grpc.RpcError as error:
                outcome = error.code().name
                stop.wait(0.01)  # a refused call: pace the retries against the real server process
            with lock:
                raw_outcomes[outcome] += 1

    threads = [threading.Thread(target=client_load) for _ in range(8)] + [threading.Thread(target=raw_load)]
    for thread in threads:
        thread.start()
    eventually(lambda: client_outcomes["ok"] >= 50 and raw_outcomes["OK"] >= 10, timeout_s=30, what="steady load")
    health = health_pb2_grpc.HealthStub(replica.channel)
    signalled = time.monotonic()
    process.process.send_signal(signal.SIGTERM)

    def status() -> int:
        answer: int = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
        return answer

    # NOT_SERVING as soon as the process has handled the signal, well inside the drain window.
    eventually(
        lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING,
        timeout_s=DRAIN_S,
        what="health NOT_SERVING after SIGTERM",
    )
    with lock:
        served_before = client_outcomes["ok"]
    eventually(
        lambda: client_outcomes["ok"] > served_before, timeout_s=DRAIN_S, what="calls served in the drain window"
    )
    code = process.process.wait(timeout=15)
    took = time.monotonic() - signalled
    with lock:
        raw_at_exit = sum(raw_outcomes.values())
    # The callers meet the exited server: what they see then counts too.
    eventually(lambda: sum(raw_outcomes.values()) >= raw_at_exit + 10, timeout_s=10, what="calls after the exit")
    stop.set()
    for thread in threads:
        thread.join()
    replica.close()

    assert code == 0
    assert took < DRAIN_S + 3.0, f"exit after the drain and the slowest call, not the whole grace ({took:.1f}s)"
    assert set(client_outcomes) <= {"ok", "unavailable"}, f"no cancelled or internal errors: {client_outcomes}"
    assert client_outcomes["ok"] > 100
    # A bare stub (no retries) sees UNAVAILABLE, and in a narrow race at grpc's own stop a CANCELLED, which
    # the client library retries like UNAVAILABLE (docs/reliability.md); what it saw is only reported here.
    assert set(raw_outcomes) <= {"OK", "UNAVAILABLE", "CANCELLED"}, raw_outcomes
    stopping = next(line for line in process.logs() if line.get("msg") == "stopping")
    assert stopping["drain_s"] == DRAIN_S
