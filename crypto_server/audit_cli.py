"""crypto-audit: check and read the audit trail (docs/security.md, "Audit trail").

    crypto-audit verify          walk every chain; report the first record edited, removed, reordered or
                                 inserted, a tail cut off past a checkpoint, and what no checkpoint covers
    crypto-audit tail [-n 20] [--tenant T]
                                 the last records, as JSON lines

It reads the same settings as the server (CRYPTO_DATA_DIR or CRYPTO_AUDIT_FILE, or MONGODB_URI and
MONGODB_DATABASE), and for verify the root key (CRYPTO_ROOT_KEY_FILE or the PKCS#11 settings): the chain
key is derived from the store's metadata key, which only the root key opens.

Exit codes: 0 every chain intact; 1 a chain was tampered with; 2 the trail or the key could not be read.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import deque
from collections.abc import Sequence

from crypto_server.app import _open_store
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.audit_chain import ChainReport
from crypto_server.domain.errors import RootKeyUnavailable, StoreUnavailable
from crypto_server.domain.key_integrity import METADATA_KEY_RECORD, MetadataAuthenticator, unwrap_metadata_key
from crypto_server.root_key import load_other_root_key, load_root_key
from crypto_server.service.audit import verify_trail
from crypto_server.storage.audit_sinks import AuditSink, AuditSinkError, FileAuditSink, MongoAuditSink

PROGRAM = "crypto-audit"
EXIT_INTACT, EXIT_TAMPERED, EXIT_ERROR = 0, 1, 2


class _Unreadable(Exception):
    pass


def _sink(settings: Settings) -> AuditSink:
    if settings.mongodb_uri:
        return MongoAuditSink(settings.mongodb_uri, settings.mongodb_database, timeout_s=settings.store_timeout_s)
    if not settings.audit_path.exists():
        raise _Unreadable(f"no audit file at {settings.audit_path} (CRYPTO_AUDIT_FILE, CRYPTO_DATA_DIR)")
    return FileAuditSink(settings.audit_path, read_only=True)


def chain_key(settings: Settings) -> bytes:
    """The audit chain key: the store's metadata key, opened with the root key (or the other root key)."""
    roots = [load_root_key(settings)]
    other = load_other_root_key(settings)
    if other is not None:
        roots.append(other)
    store, _ = _open_store(settings)
    try:
        wrapped = store.get_meta(METADATA_KEY_RECORD)
    finally:
        store.close()
        for root in roots:
            root.stop()
    if wrapped is None:
        raise _Unreadable("the key store has no metadata key, so no audit chain can be checked")
    metadata_key = unwrap_metadata_key(tuple(roots), wrapped)
    if metadata_key is None:
        raise _Unreadable("the key store's metadata key does not open under this root key")
    return MetadataAuthenticator(metadata_key).audit_chain_key()


def describe(report: ChainReport) -> str:
    if report.problem is not None:
        problem = report.problem
        return (
            f"chain {report.chain}: {problem.kind.upper()} at position {problem.position} "
            f"(record {problem.seq}): {problem.detail}"
        )
    if report.last_checkpoint_seq is None:
        coverage = f"no checkpoint yet; its {report.records} records are not covered against truncation"
    elif report.uncovered:
        coverage = (
            f"checkpoint at record {report.last_checkpoint_seq}; the {report.uncovered} records after it are not "
            "covered against truncation"
        )
    else:
        coverage = "ends with a checkpoint"
    return f"chain {report.chain}: intact, records 0 to {report.last_seq}; {coverage}"


def _verify(settings: Settings) -> int:
    key = chain_key(settings)
    sink = _sink(settings)
    try:
        reports = verify_trail(sink, key)
    finally:
        sink.close()
    if not reports:
        print(f"{PROGRAM}: the audit trail holds no records")
        return EXIT_INTACT
    for report in reports:
        print(describe(report))
    return EXIT_TAMPERED if any(r.problem for r in reports) else EXIT_INTACT


def _tail(settings: Settings, count: int, tenant: str | None) -> int:
    sink = _sink(settings)
    try:
        last = deque(
            (r for _, r in sink.records() if r is not None and (tenant is None or r.get("tenant") == tenant)),
            maxlen=count,
        )
    finally:
        sink.close()
    for record in last:
        print(json.dumps(record, sort_keys=True))
    return EXIT_INTACT


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("verify", help="check every chain of the audit trail")
    tail = commands.add_parser("tail", help="print the last records")
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many records (default 20)")
    tail.add_argument("--tenant", help="only this tenant's records")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    arguments = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if arguments.command == "verify":
            return _verify(settings)
        return _tail(settings, max(1, arguments.lines), arguments.tenant)
    except (ConfigError, StoreUnavailable, AuditSinkError, _Unreadable) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return EXIT_ERROR
    except RootKeyUnavailable as error:
        print(f"{PROGRAM}: {error.detail}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
