"""The audit trail on a real server: what it records, that tampering is found, that it fails closed, and
that no secret reaches it. Each behaviour on the embedded store (file sink) and MongoDB + Redis (collection)."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server import audit_cli
from crypto_server.service.audit import AuditTrail
from tests.conftest import ServerHandle, StartServer, error_info, expect_error
from tests.servers import MongoServer

SINK_BACKENDS = ["embedded", "mongo+redis"]
TENANT = "acme"
PLAINTEXT = b"the plaintext nobody may see in the audit trail: 8b1f0d"
AAD = b"associated data: order 4711"


def _trail(server: ServerHandle) -> AuditTrail:
    trail = server.running.audit
    assert trail is not None
    return trail


def _records(server: ServerHandle, mongo: MongoServer | None) -> list[dict[str, Any]]:
    """Every record the sink holds, in order (after writing what is queued)."""
    trail = _trail(server)
    trail.flush()
    if mongo is None:
        lines = (server.settings.data_dir / "audit.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines]
    with mongo.client() as client:
        documents = list(client[server.settings.mongodb_database]["audit_log"].find().sort("_id", 1))
    for document in documents:
        document.pop("_id")
    return documents


def _mongo(backend: str, request: pytest.FixtureRequest) -> MongoServer | None:
    return request.getfixturevalue("mongo_server") if "mongo" in backend else None


def _session(server: ServerHandle) -> dict[str, bytes]:
    """A scripted session touching every kind of call; returns the secrets it handled."""
    key = server.create_key(TENANT)
    server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    sealed = server.encrypt(TENANT, key.key_id, PLAINTEXT, AAD)
    server.decrypt(TENANT, sealed.ciphertext, AAD)
    with pytest.raises(grpc.RpcError):
        server.decrypt(TENANT, sealed.ciphertext, b"wrong aad")
    data_key = server.crypto.GenerateDataKey(crypto_pb.GenerateDataKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    session = server.keys.GenerateSessionKey(key_pb.GenerateSessionKeyRequest(tenant_id=TENANT))
    mac_key = server.create_key(TENANT, algorithm=resources_pb2.ALGORITHM_HMAC_SHA256)
    server.crypto.ComputeMac(crypto_pb.ComputeMacRequest(tenant_id=TENANT, key_id=mac_key.key_id, data=PLAINTEXT))
    server.keys.DisableKey(key_pb.DisableKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    server.keys.EnableKey(key_pb.EnableKeyRequest(tenant_id=TENANT, key_id=key.key_id))
    server.create_key("other-tenant")
    return {
        "plaintext": PLAINTEXT,
        "aad": AAD,
        "data key": data_key.plaintext,
        "session key": session.key_material,
    }


def _verify(
    server: ServerHandle, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    """`crypto-audit verify` with the server's settings, as an operator runs it."""
    settings = server.settings
    assert settings.root_key is not None
    monkeypatch.setenv("CRYPTO_ROOT_KEY", settings.root_key)
    monkeypatch.setenv("CRYPTO_DATA_DIR", str(settings.data_dir))
    if settings.mongodb_uri:
        monkeypatch.setenv("MONGODB_URI", settings.mongodb_uri)
        monkeypatch.setenv("MONGODB_DATABASE", settings.mongodb_database)
    capsys.readouterr()
    code = audit_cli.main(["verify"])
    return code, capsys.readouterr().out


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_a_scripted_session_is_recorded_and_verifies(
    backend: str,
    start_server: StartServer,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(audit_crypto="all")
    _session(server)
    records = _records(server, _mongo(backend, request))
    calls = [r for r in records if r["type"] == "call"]
    rotations = [r for r in calls if r["rpc"] == "RotateKey"]
    # Before and after: the intent record precedes the change, the outcome names the new primary version.
    assert [(r["phase"], r["outcome"], r["key_version"]) for r in rotations] == [
        ("intent", "PENDING", 0),
        ("outcome", "OK", 2),
    ]
    assert {r["rpc"] for r in calls} >= {
        "CreateKey", "RotateKey", "Encrypt", "Decrypt", "GenerateDataKey", "GenerateSessionKey", "ComputeMac",
        "DisableKey", "EnableKey",
    }  # fmt: skip
    failed_decrypt = [r for r in calls if r["rpc"] == "Decrypt" and r["outcome"] != "OK"]
    assert [r["outcome"] for r in failed_decrypt] == ["INVALID_ARGUMENT"]
    for record in calls:
        assert record["principal"] == "anonymous" and record["auth"] == "none"
        assert record["peer"].startswith("ipv4:127.0.0.1:") and record["request_id"]
    assert [r["seq"] for r in records] == list(range(len(records)))

    code, out = _verify(server, monkeypatch, capsys)
    assert code == 0, out
    assert "intact" in out


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_no_secret_reaches_the_audit_trail(
    backend: str, start_server: StartServer, request: pytest.FixtureRequest
) -> None:
    server = start_server(audit_crypto="all")
    secrets = _session(server)
    written = json.dumps(_records(server, _mongo(backend, request))).encode()
    if backend == "embedded":
        written += (server.settings.data_dir / "audit.jsonl.checkpoints").read_bytes()
    for name, secret in secrets.items():
        assert secret
        for form in (secret, secret.hex().encode(), base64.b64encode(secret), base64.b64encode(secret)[:16]):
            assert form not in written, f"the {name} appears in the audit trail"


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_crypto_operations_are_recorded_only_when_refused_by_default(
    backend: str, start_server: StartServer, request: pytest.FixtureRequest
) -> None:
    server = start_server()
    _session(server)
    crypto_rpcs = {"Encrypt", "Decrypt", "GenerateDataKey", "ComputeMac"}
    recorded = [
        (r["rpc"], r["outcome"])
        for r in _records(server, _mongo(backend, request))
        if r["type"] == "call" and r["rpc"] in crypto_rpcs
    ]
    assert recorded == [("Decrypt", "INVALID_ARGUMENT")]


def _tamper_file(path: Path, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps(r) + "\n" for r in change(records)))


def _tamper_mongo(
    mongo: MongoServer, database: str, change: Callable[[list[dict[str, Any]]], list[dict[str, Any]]]
) -> None:
    """Rewrite the collection in place: documents keep their _id (the order verify reads), contents change."""
    with mongo.client() as client:
        log = client[database]["audit_log"]
        log.drop_index("one_record_per_seq")  # whoever can write to the collection can drop its index too
        documents = list(log.find().sort("_id", 1))
        ids = [d.pop("_id") for d in documents]
        changed = change(documents)
        for document_id in ids[len(changed) :]:
            log.delete_one({"_id": document_id})
        for document_id, document in zip(ids, changed, strict=False):
            log.replace_one({"_id": document_id}, document)


def _edit(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records[4]["outcome"] = "PERMISSION_DENIED"
    return records


def _delete(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    del records[4]
    return records


def _swap(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    records[4], records[5] = records[5], records[4]
    return records


def _truncate(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    # Cut past the last checkpoint (the one written when the trail closed) and the two records before it.
    last_checkpoint = max(i for i, r in enumerate(records) if r["type"] == "checkpoint")
    return records[: last_checkpoint - 2]


@pytest.mark.parametrize("backend", SINK_BACKENDS)
@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (_edit, "EDITED at position 5 (record 4)"),
        (_delete, "REMOVED at position 5 (record 4)"),
        (_swap, "REORDERED at position 5 (record 4)"),
        (_truncate, "TRUNCATED"),
    ],
)
def test_verify_reports_the_first_tampered_record(
    backend: str,
    tamper: Callable[[list[dict[str, Any]]], list[dict[str, Any]]],
    expected: str,
    start_server: StartServer,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = start_server(audit_checkpoint_records=4)
    _session(server)
    _trail(server).close()  # as at shutdown: everything written, a last checkpoint
    code, out = _verify(server, monkeypatch, capsys)
    assert code == 0, out
    assert "ends with a checkpoint" in out

    mongo = _mongo(backend, request)
    if mongo is None:
        _tamper_file(server.settings.data_dir / "audit.jsonl", tamper)
    else:
        _tamper_mongo(mongo, server.settings.mongodb_database, tamper)
    code, out = _verify(server, monkeypatch, capsys)
    assert code == 1, out
    assert expected in out, out


@pytest.mark.parametrize("backend", ["embedded"])
def test_a_record_rewritten_with_a_recomputed_hash_is_still_found(
    backend: str, start_server: StartServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Someone with write access to the files but not the root key cannot re-seal an edited record."""
    import hashlib
    import hmac

    from crypto_server.domain.audit_chain import canonical

    server = start_server()
    _session(server)
    _trail(server).close()

    def reseal(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
        records[4]["principal"] = "someone-else"
        guessed_key = hashlib.sha256(b"").digest()
        records[4]["mac"] = hmac.new(guessed_key, canonical(records[4]), hashlib.sha256).hexdigest()
        return records

    _tamper_file(server.settings.data_dir / "audit.jsonl", reseal)
    code, out = _verify(server, monkeypatch, capsys)
    assert code == 1 and "EDITED at position 5 (record 4)" in out, out


def _set_immutable(path: Path, on: bool) -> None:
    done = subprocess.run(["chattr", "+i" if on else "-i", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr is not available here: {done.stderr.decode().strip()}")


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_a_key_change_that_cannot_be_audited_is_not_made(
    backend: str, start_server: StartServer, request: pytest.FixtureRequest
) -> None:
    server = start_server()
    key = server.create_key(TENANT)
    rotate = key_pb.RotateKeyRequest(tenant_id=TENANT, key_id=key.key_id)
    mongo = _mongo(backend, request)
    audit_file = server.settings.data_dir / "audit.jsonl"
    trail = _trail(server)
    if mongo is None:
        _set_immutable(audit_file, True)
    else:
        # The sink refuses the next record: its (chain, seq) is taken, as by anyone writing to the collection.
        with mongo.client() as client:
            client[server.settings.mongodb_database]["audit_log"].insert_one(
                {"chain": trail.chain_id, "seq": trail._seq}
            )
    try:
        expect_error(
            lambda: server.keys.RotateKey(rotate), grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_AUDIT_UNAVAILABLE"
        )
        disable = key_pb.DisableKeyRequest(tenant_id=TENANT, key_id=key.key_id)
        expect_error(
            lambda: server.keys.DisableKey(disable), grpc.StatusCode.UNAVAILABLE, "ERROR_REASON_AUDIT_UNAVAILABLE"
        )
        after = server.keys.GetKey(key_pb.GetKeyRequest(tenant_id=TENANT, key_id=key.key_id)).key
        assert after.primary_version == 1
        assert after.state == resources_pb2.KEY_STATE_ENABLED
        # Crypto keeps working: its records are queued, not required.
        server.encrypt(TENANT, key.key_id, b"still served")
    finally:
        if mongo is None:
            _set_immutable(audit_file, False)
    if mongo is not None:
        with mongo.client() as client:
            client[server.settings.mongodb_database]["audit_log"].delete_one(
                {"chain": trail.chain_id, "type": {"$exists": False}}
            )
    assert server.keys.RotateKey(rotate).key.primary_version == 2


@pytest.mark.parametrize("backend", SINK_BACKENDS)
def test_read_audit_log_pages_through_one_tenants_records(backend: str, start_server: StartServer) -> None:
    server = start_server()
    _session(server)
    _trail(server).flush()
    seen: list[key_pb.AuditRecord] = []
    page_request = key_pb.ReadAuditLogRequest(tenant_id=TENANT, page_size=3)
    pages = 0
    while True:
        page = server.keys.ReadAuditLog(page_request)
        pages += 1
        assert len(page.records) <= 3
        seen.extend(page.records)
        if not page.next_page_token:
            break
        page_request.page_token = page.next_page_token
    assert pages > 2
    assert {r.tenant_id for r in seen} == {TENANT}
    assert [r.sequence for r in seen] == sorted(r.sequence for r in seen)
    rotations = [(r.phase, r.outcome) for r in seen if r.rpc == "RotateKey"]
    assert rotations == [("intent", "PENDING"), ("outcome", "OK")]
    assert all(r.principal == "anonymous" and r.time.seconds > 0 for r in seen)
    # Reading the trail is itself recorded.
    assert any(
        r.rpc == "ReadAuditLog"
        for r in server.keys.ReadAuditLog(key_pb.ReadAuditLogRequest(tenant_id=TENANT, page_size=1000)).records
    )


@pytest.mark.parametrize("backend", ["embedded"])
def test_read_audit_log_refuses_a_bad_page_token_and_page_size(backend: str, start_server: StartServer) -> None:
    server = start_server()
    for bad in (
        key_pb.ReadAuditLogRequest(tenant_id=TENANT, page_token="not-a-position"),
        key_pb.ReadAuditLogRequest(tenant_id=TENANT, page_size=5000),
        key_pb.ReadAuditLogRequest(tenant_id=""),
    ):
        with pytest.raises(grpc.RpcError) as caught:
            server.keys.ReadAuditLog(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).reason == "ERROR_REASON_INVALID_FIELD"
