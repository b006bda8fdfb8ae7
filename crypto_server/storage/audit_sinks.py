"""Where audit records go: a JSON-lines file (embedded store) or a MongoDB collection (MongoDB store).

Both keep two logs: the records of every chain, in the order they were written, and the checkpoint log
(domain/audit_chain.py says why checkpoints are kept twice). A write returns once the record is durable
(fsync; MongoDB w=majority with the journal) and raises AuditSinkError when it is not.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pymongo
from bson import ObjectId
from bson.errors import InvalidId
from pymongo import ASCENDING
from pymongo.errors import PyMongoError

from crypto_server.storage.mongo_client import AUDIT_APP_NAME, mongo_client
from crypto_server.storage.private_files import ensure_private_file

# A record is readable as (position in the sink, record or None when it does not parse).
Positioned = tuple[int, dict[str, Any] | None]


class AuditSinkError(Exception):
    """A record could not be written durably."""


class AuditSink(Protocol):
    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        """Write `records` durably, in order. Raises AuditSinkError."""
        ...

    def append_checkpoint(self, record: Mapping[str, Any]) -> None:
        """Write a checkpoint to the checkpoint log (it is in `append`'s log too). Raises AuditSinkError."""
        ...

    def last_of_chain(self, chain: str) -> Mapping[str, Any] | None:
        """The stored record of `chain` with the highest seq, when the sink can tell (None: it cannot, or
        none): after a write that failed, it tells whether the write landed all the same."""
        ...

    def records(self) -> Iterator[Positioned]:
        """Every record, in the order written."""
        ...

    def checkpoints(self) -> Iterator[dict[str, Any]]: ...

    def page(self, tenant: str, after: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        """Up to `limit` of `tenant`'s records after position `after` ("" = from the start), and the position
        to continue from ("" when there are no more)."""
        ...

    def close(self) -> None: ...


def _line(record: Mapping[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class FileAuditSink:
    """JSON lines appended to `path` (mode 0600), checkpoints to `path` + ".checkpoints".

    One write() per batch on an O_APPEND descriptor, so several processes may share the file (each writes
    its own chain) without interleaving inside a line; fdatasync before returning.
    """

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only`: for tools that read the trail; the files are neither created nor opened for writing."""
        self.path = path
        self.checkpoint_path = path.with_name(path.name + ".checkpoints")
        self._fd = self._checkpoint_fd = -1
        if read_only:
            return
        try:
            for file in (self.path, self.checkpoint_path):
                ensure_private_file(file)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            self._checkpoint_fd = os.open(self.checkpoint_path, os.O_WRONLY | os.O_APPEND)
        except OSError as error:
            raise AuditSinkError(f"cannot open the audit file {path}: {error.strerror}") from None

    @staticmethod
    def _write(fd: int, data: bytes) -> None:
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise AuditSinkError(f"short write to the audit file ({written} of {len(data)} bytes)")
            os.fdatasync(fd)
        except OSError as error:
            raise AuditSinkError(f"cannot write the audit file: {error.strerror}") from None

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        self._write(self._fd, b"".join(_line(r) for r in records))

    def append_checkpoint(self, record: Mapping[str, Any]) -> None:
        self._write(self._checkpoint_fd, _line(record))

    def last_of_chain(self, chain: str) -> Mapping[str, Any] | None:
        return None  # one write() per batch: a failed one wrote nothing to resynchronise with

    @staticmethod
    def _read(path: Path) -> Iterator[Positioned]:
        try:
            with path.open("rb") as lines:
                for number, line in enumerate(lines, start=1):
                    if line.strip():
                        yield number, _parse(line)
        except FileNotFoundError:
            return

    def records(self) -> Iterator[Positioned]:
        return self._read(self.path)

    def checkpoints(self) -> Iterator[dict[str, Any]]:
        return (record for _, record in self._read(self.checkpoint_path) if record is not None)

    def page(self, tenant: str, after: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        # A scan of the file: fine for an operator paging through a tenant's records now and then; a
        # deployment that reads its audit trail often ships it to a log store (docs/security.md).
        start = last = int(after) if after else 0
        found: list[dict[str, Any]] = []
        for number, record in self.records():
            if number <= start or record is None or record.get("tenant") != tenant:
                continue
            if len(found) == limit:
                return found, str(last)
            found.append(record)
            last = number
        return found, ""

    def close(self) -> None:
        for fd in (self._fd, self._checkpoint_fd):
            if fd >= 0:
                os.close(fd)


def _all_of_it(timeout_s: float) -> float:
    return timeout_s


class MongoAuditSink:
    """Collections `audit_log` (one document per record, unique per chain and seq) and `audit_checkpoints`."""

    def __init__(
        self, uri: str, database: str, *, timeout_s: float = 5.0, time_left: Callable[[float], float] = _all_of_it
    ) -> None:
        """`time_left` as for MongoKeyStore: the server bounds each write by its current call's deadline."""
        self._timeout_s = timeout_s
        self._time_left = time_left
        # The key store's options (w=majority with the journal, majority reads): a record the server relied on (a
        # key change went ahead) must survive a fail-over as keys do.
        self._client = mongo_client(uri, timeout_s=timeout_s, app_name=AUDIT_APP_NAME)
        db = self._client[database]
        self._log = db["audit_log"]
        self._checkpoints = db["audit_checkpoints"]
        try:
            self._log.create_index([("chain", ASCENDING), ("seq", ASCENDING)], name="one_record_per_seq", unique=True)
            self._log.create_index([("tenant", ASCENDING), ("_id", ASCENDING)], name="records_by_tenant")
        except PyMongoError as error:
            raise AuditSinkError(f"cannot prepare the audit collections: {error}") from None

    def append(self, records: Sequence[Mapping[str, Any]]) -> None:
        try:
            # Bounded, retries included, by the call's deadline and the store timeout (as key writes are).
            with pymongo.timeout(max(0.001, self._time_left(self._timeout_s))):
                # Ordered: the documents' ids (the order verify reads them in) follow the chain.
                self._log.insert_many([dict(r) for r in records], ordered=True)
        except PyMongoError as error:
            raise AuditSinkError(f"cannot write the audit log: {error}") from None

    def append_checkpoint(self, record: Mapping[str, Any]) -> None:
        try:
            with pymongo.timeout(max(0.001, self._time_left(self._timeout_s))):
                self._checkpoints.insert_one(dict(record))
        except PyMongoError as error:
            raise AuditSinkError(f"cannot write the audit checkpoint log: {error}") from None

    def last_of_chain(self, chain: str) -> Mapping[str, Any] | None:
        try:
            with pymongo.timeout(max(0.001, self._time_left(self._timeout_s))):
                document = self._log.find_one({"chain": chain}, sort=[("seq", -1)])
        except PyMongoError as error:
            raise AuditSinkError(f"cannot read the audit log: {error}") from None
        return None if document is None else self._plain(document)

    @staticmethod
    def _plain(document: dict[str, Any]) -> dict[str, Any]:
        document.pop("_id", None)
        return document

    def records(self) -> Iterator[Positioned]:
        for index, document in enumerate(self._log.find().sort("_id", ASCENDING), start=1):
            yield index, self._plain(document)

    def checkpoints(self) -> Iterator[dict[str, Any]]:
        return (self._plain(d) for d in self._checkpoints.find())

    def page(self, tenant: str, after: str, limit: int) -> tuple[list[dict[str, Any]], str]:
        query: dict[str, Any] = {"tenant": tenant}
        if after:
            try:
                query["_id"] = {"$gt": ObjectId(after)}
            except InvalidId:
                raise ValueError("not a position of this audit log") from None
        try:
            documents = list(self._log.find(query).sort("_id", ASCENDING).limit(limit + 1))
        except PyMongoError as error:
            raise AuditSinkError(f"cannot read the audit log: {error}") from None
        more = len(documents) > limit
        documents = documents[:limit]
        next_position = str(documents[-1]["_id"]) if more else ""
        return [self._plain(d) for d in documents], next_position

    def close(self) -> None:
        self._client.close()
