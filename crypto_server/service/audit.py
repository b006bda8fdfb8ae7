"""The audit trail: one keyed hash chain per server process, written to a sink (storage/audit_sinks.py).

Two ways in:
- `record` writes at once and raises AuditUnavailable when the sink refuses: for what must not happen
  unrecorded (key changes, admin calls). The caller writes it *before* acting.
- `submit` queues for a writer thread (crypto operations, denials): never blocks a call; when the bounded
  queue is full the record is dropped and counted (`on_drop`, a metric).

Sequence numbers are given when a record is written, not when it is queued, so a dropped record leaves no
gap in the chain. Checkpoints (domain/audit_chain.py) follow every `checkpoint_every` records, at least every
`checkpoint_interval_s` while there is anything new, and when the trail closes.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from crypto_server.domain.audit_chain import CHECKPOINT, GENESIS, ChainReport, authentic, seal, verify_chain
from crypto_server.domain.audit_recording import CryptoRecording
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import AuditUnavailable, InvalidArgument
from crypto_server.domain.keys import validate_tenant_id
from crypto_server.storage.audit_sinks import AuditSink, AuditSinkError, Positioned

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_EVERY = 1000
DEFAULT_CHECKPOINT_INTERVAL_S = 60.0
DEFAULT_BUFFER_RECORDS = 10_000
# A synchronous write that has taken this long is taken for a hung sink: callers are refused at once meanwhile.
_HUNG_WRITE_S = 0.5
# How often a caller waiting for the chain looks again.
_POLL_S = 0.05
# What a caller refused for want of the audit trail is told to wait (a RetryInfo) before trying again: a
# database fail-over or a dropped connection is usually over by then (docs/reliability.md).
RETRY_AFTER_S = 1.0

MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """What one record says about one call. Never plaintext, associated data, key material or tokens:
    only names, ids, numbers and the outcome."""

    rpc: str
    tenant: str
    principal: str
    auth: str
    outcome: str  # the gRPC status code name; "PENDING" for the record written before a change
    request_id: str
    peer: str
    key_id: str = ""
    key_version: int = 0
    phase: str = "outcome"  # "intent" before a change, "outcome" after any call


def new_chain_id() -> str:
    """Unique per server process: the host, the process, and randomness (a restarted pid is a new chain)."""
    return f"{socket.gethostname()[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


class AuditTrail:
    def __init__(
        self,
        sink: AuditSink,
        chain_key: bytes,
        clock: Clock,
        *,
        chain_id: str | None = None,
        crypto: CryptoRecording | None = None,
        checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
        checkpoint_interval_s: float = DEFAULT_CHECKPOINT_INTERVAL_S,
        buffer_records: int = DEFAULT_BUFFER_RECORDS,
        on_drop: Callable[[], None] | None = None,
    ) -> None:
        self.sink = sink
        self.chain_id = chain_id or new_chain_id()
        self.crypto = crypto or CryptoRecording("denied_only")
        self._key = chain_key
        self._clock = clock
        self._checkpoint_every = checkpoint_every
        self._checkpoint_interval_s = checkpoint_interval_s
        self._on_drop = on_drop or (lambda: None)
        self._lock = threading.Lock()  # the chain's head: one writer at a time
        # A write failed since the sink was last asked what it holds: it may have landed all the same (see
        # _append_locked), even after later writes failed in turn.
        self._unconfirmed = False
        # When the current synchronous write began (None: no write in progress), to tell a slow sink from a hung one.
        self._writing_since: float | None = None
        self._seq = 0
        self._head = GENESIS
        self._since_checkpoint = 0
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue(maxsize=buffer_records)
        self._writer: threading.Thread | None = None
        self.dropped = 0
        self._closed = False

    # -- writing ------------------------------------------------------------------------------------------

    def _next(self, kind: str, fields: Mapping[str, Any], after: dict[str, Any] | None = None) -> dict[str, Any]:
        """The record that follows `after` (by default the chain's head), sealed; under the lock."""
        record = {
            "chain": self.chain_id,
            "seq": self._seq if after is None else after["seq"] + 1,
            "type": kind,
            "time": self._clock.now().isoformat(timespec="milliseconds"),
            **fields,
            "prev": self._head if after is None else after["mac"],
        }
        return seal(self._key, record)

    def _append_locked(self, records: list[dict[str, Any]]) -> None:
        """Write sealed records (built after `_resynchronise`); the head moves only once they are durable."""
        try:
            self.sink.append(records)
        except AuditSinkError:
            # A write that timed out may have landed all the same (a database that froze after writing): the
            # next write first asks the sink, so the chain continues from what is stored instead of colliding
            # with it. Not now: the caller has waited long enough.
            self._unconfirmed = True
            raise
        self._advance(records)

    def _advance(self, records: list[dict[str, Any]]) -> None:
        self._seq += len(records)
        self._head = records[-1]["mac"]
        self._since_checkpoint += len(records)

    def _resynchronise(self) -> None:
        """Continue after what the sink holds of this chain beyond the head: records of writes reported as failed
        that landed all the same. Any of them, not only the last write's: a write held by a database fail-over
        can land after the next one asked and failed in turn (before, the chain then collided with it for good).
        Only this process writes this chain, and only with its key: an authentic record past the head is one of
        its own. Raises AuditSinkError (unreadable)."""
        last = self.sink.last_of_chain(self.chain_id)
        seq = last.get("seq") if last is not None else None
        if last is not None and isinstance(seq, int) and seq >= self._seq and authentic(self._key, last):
            # Ordered writes: a batch lands as a prefix, so every record up to this one is stored.
            self._since_checkpoint += seq + 1 - self._seq
            self._seq = seq + 1
            self._head = last["mac"]
            log.warning("an audit write reported as failed had landed; the chain continues after it")
        self._unconfirmed = False

    def _write_locked(self, events: list[AuditEvent]) -> None:
        if self._unconfirmed:
            self._resynchronise()
        records: list[dict[str, Any]] = []
        for event in events:
            records.append(self._next("call", asdict(event), records[-1] if records else None))
        self._append_locked(records)
        if self._since_checkpoint >= self._checkpoint_every:
            self._checkpoint_locked()

    def _checkpoint_locked(self) -> None:
        """A checkpoint in the chain and in the checkpoint log. Its failure does not fail a call: the
        records themselves are written; only the truncation bound loosens (logged)."""
        try:
            if self._unconfirmed:
                self._resynchronise()
            record = self._next(CHECKPOINT, {"covers": self._seq})
            self._append_locked([record])
            self.sink.append_checkpoint(record)
        except AuditSinkError as error:
            log.error("audit checkpoint not written", extra={"chain": self.chain_id, "error": str(error)})
            return
        self._since_checkpoint = 0
        log.info("audit checkpoint", extra={"chain": self.chain_id, "seq": record["seq"], "mac": record["mac"]})

    def start(self) -> None:
        """Open the chain (a "start" record, written at once) and start the writer.

        Raises AuditSinkError: a server that cannot audit does not start.
        """
        with self._lock:
            self._append_locked([self._next("start", {"host": socket.gethostname()[:64], "pid": os.getpid()})])
        self._writer = threading.Thread(target=self._drain, name="audit-writer", daemon=True)
        self._writer.start()

    def record(self, event: AuditEvent) -> None:
        """Write `event` now. Raises AuditUnavailable when it cannot be written.

        Never lets a sink that hangs (a frozen database) hold more than one worker: callers queue for the
        chain while its writer makes progress, but once a write has taken longer than `_HUNG_WRITE_S` (a
        healthy one takes milliseconds) every caller is refused at once until it returns. Otherwise a storm
        of key changes against a dead sink would take every worker, health checks included.
        """
        while not self._lock.acquire(timeout=_POLL_S):
            started = self._writing_since
            if started is not None and time.monotonic() - started > _HUNG_WRITE_S:
                raise AuditUnavailable(retry_after_s=RETRY_AFTER_S)
        self._writing_since = time.monotonic()
        try:
            self._write_locked([event])
        except AuditSinkError as error:
            log.error("audit record not written", extra={"chain": self.chain_id, "error": str(error)})
            raise AuditUnavailable(retry_after_s=RETRY_AFTER_S) from None
        finally:
            self._writing_since = None
            self._lock.release()

    def submit(self, event: AuditEvent) -> None:
        """Queue `event` for the writer; dropped (and counted) when the queue is full."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            self._on_drop()

    def _drain(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=self._checkpoint_interval_s)
            except queue.Empty:
                with self._lock:
                    if self._since_checkpoint:
                        self._checkpoint_locked()
                continue
            batch = [first]
            while len(batch) < 256:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = [event for event in batch if event is not None]
            if events:
                with self._lock:
                    try:
                        self._write_locked(events)
                    except AuditSinkError as error:
                        self.dropped += len(events)
                        for _ in events:
                            self._on_drop()
                        log.error("audit records dropped", extra={"chain": self.chain_id, "error": str(error)})
            for _ in batch:
                self._queue.task_done()
            if None in batch:
                return

    def flush(self) -> None:
        """Wait until every queued record is written (or dropped)."""
        self._queue.join()

    def close(self) -> None:
        """Write what is queued and a last checkpoint, then close the sink. A second call does nothing."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._queue.put(None)
            self._writer.join()
        with self._lock:
            if self._since_checkpoint:
                self._checkpoint_locked()
        self.sink.close()

    stop = close  # the server stops its background tasks by this name

    # -- reading ------------------------------------------------------------------------------------------

    def page(self, tenant: str, page_token: str, page_size: int) -> tuple[list[dict[str, Any]], str]:
        """A page of `tenant`'s records, oldest first, and the token of the next page ("" at the end)."""
        validate_tenant_id(tenant)
        if not 0 <= page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be between 1 and {MAX_PAGE_SIZE} (0 for {DEFAULT_PAGE_SIZE})")
        try:
            records, after = self.sink.page(tenant, page_token, page_size or DEFAULT_PAGE_SIZE)
        except ValueError:
            raise InvalidArgument("page_token", "not a token this server returned; start again without one") from None
        except AuditSinkError:
            raise AuditUnavailable(
                "the audit trail cannot be read right now; retry later", retry_after_s=RETRY_AFTER_S
            ) from None
        return records, after


def verify_trail(sink: AuditSink, chain_key: bytes) -> list[ChainReport]:
    """Check every chain in `sink` (domain/audit_chain.py), in the order the chains begin."""
    chains: dict[str, list[Positioned]] = {}
    for position, record in sink.records():
        chain = record.get("chain") if record is not None else None
        # An unreadable record, or one whose chain id is not text, forms a chain of its own and fails there.
        chains.setdefault(chain if isinstance(chain, str) else f"?{position}", []).append((position, record))
    checkpoints: dict[str, list[dict[str, Any]]] = {}
    for checkpoint in sink.checkpoints():
        chain = checkpoint.get("chain")
        if isinstance(chain, str):
            checkpoints.setdefault(chain, []).append(checkpoint)
    reports = [verify_chain(chain, items, chain_key, checkpoints.pop(chain, [])) for chain, items in chains.items()]
    # A chain whose every record is gone, while the checkpoint log still knows it: cut off entirely.
    for chain, kept in checkpoints.items():
        if any(authentic(chain_key, c) for c in kept):
            reports.append(verify_chain(chain, [], chain_key, kept))
    return reports
