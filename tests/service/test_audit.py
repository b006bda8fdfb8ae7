"""The audit trail without a server: denials, sampling, the bounded queue, and the settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_server.call_context import Principal, current_principal
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.audit_recording import CryptoRecording
from crypto_server.domain.errors import AuditUnavailable
from crypto_server.service.audit import AuditEvent, AuditTrail, verify_trail
from crypto_server.storage.audit_sinks import AuditSinkError, FileAuditSink
from crypto_server.transport.call_audit import CallAudit
from tests.conftest import FakeClock

CHAIN_KEY = bytes(range(32))


class _Context:
    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"


def _trail(tmp_path: Path, **options: Any) -> AuditTrail:
    trail = AuditTrail(FileAuditSink(tmp_path / "audit.jsonl"), CHAIN_KEY, FakeClock(), **options)
    trail.start()
    return trail


def _calls(trail: AuditTrail) -> list[dict[str, Any]]:
    trail.flush()
    return [r for _, r in trail.sink.records() if r is not None and r["type"] == "call"]


@pytest.mark.parametrize("code", [grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED])
@pytest.mark.parametrize("method", ["GetKey", "Encrypt", "RotateKey"])
def test_every_denial_is_recorded_with_its_principal_whatever_the_method(
    tmp_path: Path, method: str, code: grpc.StatusCode
) -> None:
    trail = _trail(tmp_path, crypto=CryptoRecording("none"))
    audit = CallAudit(trail)
    token = current_principal.set(Principal("spiffe://caas/ns/media/sa/media", "mtls"))
    try:
        request = key_pb.GetKeyRequest(tenant_id="acme", key_id="k-1")
        audit.finished(f"/caas.crypto.v1.KeyService/{method}", request, None, _Context(), "r-1", code, False)
    finally:
        current_principal.reset(token)
    [record] = _calls(trail)
    assert (record["rpc"], record["outcome"], record["tenant"], record["key_id"]) == (method, code.name, "acme", "k-1")
    assert (record["principal"], record["auth"], record["peer"]) == (
        "spiffe://caas/ns/media/sa/media",
        "mtls",
        "ipv4:127.0.0.1:5000",
    )
    trail.close()


def test_sampled_records_one_success_in_n_and_every_failure(tmp_path: Path) -> None:
    trail = _trail(tmp_path, crypto=CryptoRecording.parse("sampled:3"))
    audit = CallAudit(trail)
    request = crypto_pb.EncryptRequest(tenant_id="acme", key_id="k-1", plaintext=b"secret")
    for _ in range(6):
        audit.finished(
            "/caas.crypto.v1.CryptoService/Encrypt", request, None, _Context(), "r", grpc.StatusCode.OK, False
        )
    audit.finished(
        "/caas.crypto.v1.CryptoService/Encrypt", request, None, _Context(), "r", grpc.StatusCode.NOT_FOUND, False
    )
    assert [r["outcome"] for r in _calls(trail)] == ["OK", "OK", "NOT_FOUND"]
    trail.close()


def test_a_full_queue_drops_records_counts_them_and_keeps_the_chain_whole(tmp_path: Path) -> None:
    drops: list[None] = []
    trail = AuditTrail(
        FileAuditSink(tmp_path / "audit.jsonl"),
        CHAIN_KEY,
        FakeClock(),
        buffer_records=2,
        on_drop=lambda: drops.append(None),
    )
    event = AuditEvent("Encrypt", "acme", "anonymous", "none", "OK", "r", "peer")
    for _ in range(5):  # the writer is not started yet: the queue fills
        trail.submit(event)
    assert (trail.dropped, len(drops)) == (3, 3)
    trail.start()
    trail.close()
    [report] = verify_trail(FileAuditSink(tmp_path / "audit.jsonl", read_only=True), CHAIN_KEY)
    assert report.problem is None and report.records == 4 and report.uncovered == 0  # start, 2 calls, checkpoint


def test_checkpoints_follow_every_n_records_and_the_uncovered_tail_is_reported(tmp_path: Path) -> None:
    trail = _trail(tmp_path, checkpoint_every=3)
    event = AuditEvent("RotateKey", "acme", "anonymous", "none", "OK", "r", "peer")
    for _ in range(4):
        trail.record(event)
    trail.sink.close()
    [report] = verify_trail(FileAuditSink(tmp_path / "audit.jsonl", read_only=True), CHAIN_KEY)
    # start + 2 calls, checkpoint (seq 3); 2 more calls not yet covered.
    assert (report.problem, report.last_checkpoint_seq, report.uncovered) == (None, 3, 2)


def test_the_crypto_recording_setting_is_validated() -> None:
    assert Settings.from_env({}).audit_crypto == "denied_only"
    assert Settings.from_env({"CRYPTO_AUDIT_CRYPTO": "Sampled:10"}).audit_crypto == "sampled:10"
    for bad in ("sometimes", "sampled:0", "sampled:x"):
        with pytest.raises(ConfigError, match="CRYPTO_AUDIT_CRYPTO"):
            Settings.from_env({"CRYPTO_AUDIT_CRYPTO": bad})
    assert Settings.from_env({"CRYPTO_DATA_DIR": "/srv/d"}).audit_path == Path("/srv/d/audit.jsonl")
    assert Settings.from_env({"CRYPTO_AUDIT_FILE": "/var/log/a.jsonl"}).audit_path == Path("/var/log/a.jsonl")


def test_a_forged_record_slipped_between_two_is_reported_as_inserted(tmp_path: Path) -> None:
    trail = _trail(tmp_path)
    for _ in range(3):
        trail.record(AuditEvent("RotateKey", "acme", "anonymous", "none", "OK", "r", "peer"))
    trail.close()
    path = tmp_path / "audit.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    forged = lines[2].replace('"outcome":"OK"', '"outcome":"PERMISSION_DENIED"')
    path.write_text("".join([*lines[:3], forged, *lines[3:]]))
    [report] = verify_trail(FileAuditSink(path, read_only=True), CHAIN_KEY)
    assert report.problem is not None
    assert (report.problem.kind, report.problem.position, report.problem.seq) == ("inserted", 4, 3)


class _LandsThenFails(FileAuditSink):
    """A sink whose next write lands and is then reported as failed (a database that froze after writing),
    and which can tell what it holds, as the MongoDB sink can."""

    fail_next = False

    def append(self, records: Any) -> None:
        super().append(records)
        if self.fail_next:
            self.fail_next = False
            raise AuditSinkError("timed out (but written)")

    def last_of_chain(self, chain: str) -> dict[str, Any] | None:
        mine = [r for _, r in self.records() if r is not None and r.get("chain") == chain]
        return max(mine, key=lambda r: r["seq"]) if mine else None


class _Late(_LandsThenFails):
    """A sink like MongoDB's on a fail-over: one sequence number per chain at most (the unique index), a write
    can be held and land only later, after the writer gave up on it, and a write can fail without landing."""

    hold_next = False
    refuse_next = False
    held: list[Any] | None = None

    def append(self, records: Any) -> None:
        if self.hold_next:
            self.hold_next, self.held = False, list(records)
            raise AuditSinkError("timed out (still on its way)")
        if self.refuse_next:
            self.refuse_next = False
            raise AuditSinkError("not primary")
        stored = {(r["chain"], r["seq"]) for _, r in self.records() if r is not None}
        if any((r["chain"], r["seq"]) in stored for r in records):
            raise AuditSinkError("duplicate key (chain, seq)")
        super().append(records)

    def land_held(self) -> None:
        assert self.held is not None
        held, self.held = self.held, None
        self.append(held)


def test_a_write_that_lands_after_the_next_one_failed_does_not_wedge_the_chain(tmp_path: Path) -> None:
    """A record held by a fail-over lands after the next write checked for it and failed too. Before, the trail
    only compared what is stored with its last failed write: every later record reused the landed one's sequence
    number and collided with it, and every audited call was refused until the server restarted."""
    sink = _Late(tmp_path / "audit.jsonl")
    trail = AuditTrail(sink, CHAIN_KEY, FakeClock())
    trail.start()

    def event(request_id: str) -> AuditEvent:
        return AuditEvent(rpc="RotateKey", tenant="t1", principal="p", auth="mtls", outcome="PENDING",
                          request_id=request_id, peer="", key_id="k", key_version=0, phase="intent")  # fmt: skip

    trail.record(event("r1"))
    sink.hold_next = True
    with pytest.raises(AuditUnavailable):
        trail.record(event("r2"))  # held: lands later
    sink.refuse_next = True
    with pytest.raises(AuditUnavailable):
        trail.record(event("r3"))  # another call: the held record has not landed yet, and this one fails too
    sink.land_held()
    trail.record(event("r4"))
    trail.record(event("r5"))
    trail.flush()
    (report,) = verify_trail(sink, CHAIN_KEY)
    assert report.problem is None, report


def test_a_write_reported_failed_that_landed_does_not_break_the_chain(tmp_path: Path) -> None:
    sink = _LandsThenFails(tmp_path / "audit.jsonl")
    trail = AuditTrail(sink, CHAIN_KEY, FakeClock())
    trail.start()
    event = AuditEvent(
        rpc="RotateKey",
        tenant="t1",
        principal="p",
        auth="mtls",
        outcome="PENDING",
        request_id="r1",
        peer="",
        key_id="k",
        key_version=0,
        phase="intent",
    )
    sink.fail_next = True
    with pytest.raises(AuditUnavailable):
        trail.record(event)
    trail.record(event)  # continues after the record that landed, instead of reusing its sequence number
    trail.flush()
    (report,) = verify_trail(sink, CHAIN_KEY)
    assert report.problem is None, report


class _LandsLater(_LandsThenFails):
    """A sink whose failed write lands only after the next read of what it holds, as a frozen database does
    that answers a read sent after the write before it processes the write."""

    held_back: Any = None

    def append(self, records: Any) -> None:
        if self.fail_next:
            self.fail_next = False
            self.held_back = records
            raise AuditSinkError("timed out (not written yet)")
        if any(r["seq"] in {h["seq"] for h in self.held_back or []} for r in records) and self.landed:
            raise AuditSinkError("duplicate key: one_record_per_seq")
        super().append(records)

    landed = False

    def last_of_chain(self, chain: str) -> dict[str, Any] | None:
        found = super().last_of_chain(chain)
        if self.held_back is not None and not self.landed:
            FileAuditSink.append(self, self.held_back)  # lands now, after the read
            self.landed = True
        return found


def test_a_failed_write_that_lands_after_the_chain_was_read_again_does_not_stop_the_trail(tmp_path: Path) -> None:
    """Issue 22 (found by make chaos): the late record took the sequence number the next write reused; that
    write was refused as a duplicate, and so was every one after it: every key change answered
    AUDIT_UNAVAILABLE until a restart."""
    sink = _LandsLater(tmp_path / "audit.jsonl")
    trail = AuditTrail(sink, CHAIN_KEY, FakeClock())
    trail.start()

    def event(request_id: str) -> AuditEvent:
        return AuditEvent("RotateKey", "t1", "p", "mtls", "PENDING", request_id, "", key_id="k", phase="intent")

    sink.fail_next = True
    with pytest.raises(AuditUnavailable):
        trail.record(event("r1"))
    with pytest.raises(AuditUnavailable):
        trail.record(event("r2"))  # read what the sink held (nothing new), then collided with the late record
    for number in range(3, 6):
        trail.record(event(f"r{number}"))  # continues after the late record
    trail.close()
    (report,) = verify_trail(FileAuditSink(tmp_path / "audit.jsonl", read_only=True), CHAIN_KEY)
    assert report.problem is None, report
