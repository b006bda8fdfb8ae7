"""The audit trail's record format, its keyed hash chain, and the check of a chain.

Record (one JSON object; a JSON line in the file sink, a document in MongoDB):

    {"chain": "<chain id>", "seq": 0, "type": "start" | "call" | "checkpoint", "time": "<ISO 8601 UTC>",
     ... the type's fields ...,
     "prev": "<hex mac of record seq-1; 64 zeros for seq 0>", "mac": "<hex HMAC-SHA256>"}

`mac` = HMAC-SHA256(chain key, "caas.crypto.v1/audit-record\\0" || canonical JSON of the record without
`mac`), canonical = sorted keys, no spaces, ASCII. Because `prev` and `seq` are inside the MAC, each record
vouches for its place: editing any field breaks its own MAC; removing, reordering or inserting a record
breaks the sequence or the link of the next one. The chain key is derived from the store's metadata key,
itself wrapped under the root key (key_integrity.py), so write access to the files or the database is not
enough to write a record that verifies.

A chain has one writer (one server process), which names it: replicas never share a chain.

Checkpoints: a record of type "checkpoint" is a record like any other (its MAC over its `seq` and `prev`
signs the chain's head), and is also written to a second place (the sink's checkpoint log). Cutting records
off the end of a chain leaves a valid-looking shorter chain; a checkpoint in the second place that the chain
no longer reaches shows the cut. A cut after the last checkpoint is not detectable from the store alone:
the checkpoint interval bounds it, and the server log carries each checkpoint too.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_RECORD_DOMAIN = b"caas.crypto.v1/audit-record\x00"
GENESIS = "0" * 64
CHECKPOINT = "checkpoint"


def canonical(record: Mapping[str, Any]) -> bytes:
    body = {name: value for name, value in record.items() if name != "mac"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_mac(chain_key: bytes, record: Mapping[str, Any]) -> str:
    return hmac.new(chain_key, _RECORD_DOMAIN + canonical(record), hashlib.sha256).hexdigest()


def seal(chain_key: bytes, record: Mapping[str, Any]) -> dict[str, Any]:
    """`record` (with its chain, seq and prev) and its MAC."""
    sealed = dict(record)
    sealed["mac"] = record_mac(chain_key, sealed)
    return sealed


def authentic(chain_key: bytes, record: Mapping[str, Any]) -> bool:
    mac = record.get("mac")
    return isinstance(mac, str) and hmac.compare_digest(record_mac(chain_key, record), mac)


@dataclass(frozen=True, slots=True)
class Problem:
    """The first thing wrong with a chain: `kind` is edited, removed, reordered, inserted or truncated."""

    kind: str
    position: int  # where in the sink (line number of the file, 1-based; index in storage order in MongoDB)
    seq: int  # the sequence number of the record concerned (the first missing one for removed/truncated)
    detail: str


@dataclass(frozen=True, slots=True)
class ChainReport:
    chain: str
    records: int
    last_seq: int
    last_checkpoint_seq: int | None  # the last checkpoint in the chain itself
    problem: Problem | None

    @property
    def uncovered(self) -> int:
        """Records after the last checkpoint: a cut among them would not be detected."""
        covered = -1 if self.last_checkpoint_seq is None else self.last_checkpoint_seq
        return self.last_seq - covered


def _seq(record: Mapping[str, Any]) -> int | None:
    value = record.get("seq")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def verify_chain(
    chain: str,
    items: Sequence[tuple[int, Mapping[str, Any] | None]],
    chain_key: bytes,
    checkpoints: Iterable[Mapping[str, Any]] = (),
) -> ChainReport:
    """Check one chain's records, given in storage order as (position, record or None if unreadable).

    `checkpoints`: this chain's records from the sink's checkpoint log.
    """
    expected, prev = 0, GENESIS
    last_checkpoint: int | None = None
    macs: dict[int, str] = {}
    last_position = items[-1][0] if items else 0

    def report(problem: Problem | None) -> ChainReport:
        return ChainReport(chain, len(items), expected - 1, last_checkpoint, problem)

    for index, (position, record) in enumerate(items):
        if record is None or not authentic(chain_key, record):
            following = items[index + 1][1] if index + 1 < len(items) else None
            if (
                following is not None
                and authentic(chain_key, following)
                and _seq(following) == expected
                and following.get("prev") == prev
            ):
                return report(Problem("inserted", position, expected, "a record that is not part of the chain"))
            return report(Problem("edited", position, expected, "the record does not match its MAC"))
        seq = _seq(record)
        assert seq is not None  # an authentic record was written with one
        if seq == expected and record.get("prev") == prev:
            prev = macs[seq] = str(record["mac"])
            if record.get("type") == CHECKPOINT:
                last_checkpoint = seq
            expected += 1
            continue
        if seq > expected:
            if any(_seq(later or {}) == expected for _, later in items[index + 1 :]):
                return report(Problem("reordered", position, expected, f"record {seq} comes before record {expected}"))
            return report(Problem("removed", position, expected, f"records {expected} to {seq - 1} are missing"))
        if seq < expected:
            return report(
                Problem("reordered", position, seq, f"record {seq} appears again after record {expected - 1}")
            )
        return report(Problem("inserted", position, seq, "the record does not link to the one before it"))
    for checkpoint in sorted(
        (c for c in checkpoints if authentic(chain_key, c)), key=lambda c: _seq(c) or 0, reverse=True
    ):
        seq = _seq(checkpoint)
        if seq is None:
            continue
        if macs.get(seq) != checkpoint.get("mac"):
            return report(
                Problem(
                    "truncated",
                    last_position + 1,
                    expected,
                    f"the checkpoint log holds checkpoint {seq} of this chain, which ends at record {expected - 1}",
                )
            )
        break
    return report(None)
