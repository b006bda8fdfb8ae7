"""cryptoctl — manage keys, encrypt and decrypt values or files of any size, check health.

    cryptoctl keys create --label team=media
    cryptoctl keys list --json
    KEY=$(cryptoctl keys create -f key_id)
    CT=$(cryptoctl encrypt --key "$KEY" --value "hello" -f ciphertext)
    cryptoctl decrypt --value "$CT" --text -f plaintext
    cryptoctl encrypt --key "$KEY" --in video.mp4 --out video.mp4.enc
    cryptoctl decrypt --in video.mp4.enc > video.mp4

Global options (--target, --tenant, --json, --field, --timeout) go before or after the command.
Target and tenant default to $CRYPTO_TARGET (localhost:3009) and $CRYPTO_TENANT. TLS: --ca ($CRYPTO_CA_FILE);
mTLS: also --cert and --client-key ($CRYPTO_CERT_FILE, $CRYPTO_KEY_FILE); a bearer token: --token ($CRYPTO_TOKEN).

Exit codes: 0 success; 1 any other error; 2 usage; 3 not found; 4 invalid argument or undecryptable input;
5 the key's state forbids it (disabled, expired, wrong type or algorithm); 6 service unavailable, circuit
open or deadline exceeded; 7 not serving (health); 8 a local file cannot be read or written; 141 the reader
of the output went away (| head). The full reference is docs/cli.md.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict
from dataclasses import fields as dataclass_fields
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from crypto_client import (
    Algorithm,
    ClientConfig,
    CryptoClient,
    CryptoClientError,
    DeadlineExceededError,
    DecryptionError,
    FailedPreconditionError,
    FileCipher,
    HealthStatus,
    InvalidArgumentError,
    Key,
    KeyNotFoundError,
    KeyState,
    KeyType,
    KeyVersion,
    ServiceUnavailableError,
    tls_credentials,
)
from crypto_client.files import write_atomically

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_PRECONDITION, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5, 6
EXIT_NOT_SERVING, EXIT_FILE = 7, 8
# What a shell reports for a process that SIGPIPE ended: `yes | head` and friends under `set -o pipefail`.
EXIT_BROKEN_PIPE = 128 + 13
_ALGORITHMS = {
    "aes-256-gcm": Algorithm.AES_256_GCM,
    "hmac-sha256": Algorithm.HMAC_SHA256,
    "ed25519": Algorithm.ED25519,
    "ecdsa-p256": Algorithm.ECDSA_P256_SHA256,
}
# The first byte of every ciphertext names its format (docs/ciphertext-format.md, domain/stream_format.py).
_VALUE_FORMAT, _STREAM_FORMAT = 1, 2
_USE_VALUE = "it is a value ciphertext (from encrypt --value): decrypt it with --value BASE64, not as a file"
_USE_FILE = "it is a file ciphertext (from encrypt --in or stdin): decrypt it with --in FILE or stdin, not --value"


class UsageError(Exception):
    """The command line asks for something impossible; exit 2."""


class FileError(Exception):
    """A local file cannot be read or written; exit 8."""


class WrongInput(Exception):
    """Input that cannot be decrypted as asked, found before calling the service; exit 4."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, not argparse's usage block: the usage is one `--help` away.
        raise UsageError(f"{message} (see {self.prog} --help)")


def _plain(value: Any) -> Any:
    """JSON-friendly form of the client's dataclasses."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _key_fields(key: Key) -> dict[str, Any]:
    fields: dict[str, Any] = _plain(asdict(key))
    fields["labels"] = dict(key.labels)
    return fields


def _key_row(key: Key) -> dict[str, Any]:
    return {
        "key_id": key.key_id,
        "type": key.key_type.value,
        "algorithm": key.algorithm.value,
        "state": key.state.value,
        "primary_version": key.primary_version,
        "created_at": key.created_at.isoformat(timespec="seconds"),
        "expires_at": key.expires_at.isoformat(timespec="seconds") if key.expires_at else "",
        "labels": ",".join(f"{k}={v}" for k, v in sorted(key.labels.items())),
    }


def _version_row(version: KeyVersion) -> dict[str, Any]:
    def moment(value: datetime | None) -> str:
        return value.isoformat(timespec="seconds") if value else ""

    return {
        "version": version.version,
        "state": version.state.value,
        "created_at": moment(version.created_at),
        "expires_at": moment(version.expires_at),
        "encryptions": version.encryptions,
        "destroy_at": moment(version.destroy_at),
        "destroyed_at": moment(version.destroyed_at),
    }


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _raw(value: Any) -> str:
    """A field as `--field` prints it: text as it is, anything structured as JSON."""
    return value if isinstance(value, str) else json.dumps(value)


class Output:
    """One result is one JSON object (or `name: value` lines); only lists are JSON lists (or a table)."""

    def __init__(self, as_json: bool, field: str | None) -> None:
        self.as_json = as_json
        self.field = field

    def _pick(self, fields: dict[str, Any]) -> str:
        self._check_field(list(fields))
        return _raw(fields[str(self.field)])

    def _check_field(self, names: Sequence[str]) -> None:
        if self.field not in names:
            raise UsageError(f"--field {self.field}: no such field; this command has {', '.join(names)}")

    def one(self, fields: dict[str, Any], *, text: Callable[[], str] | None = None) -> None:
        if self.field:
            print(self._pick(fields))
        elif self.as_json:
            print(json.dumps(fields, indent=2))
        else:
            print(text() if text else "\n".join(f"{name}: {_raw(value)}".rstrip() for name, value in fields.items()))

    def key(self, key: Key) -> None:
        self.one(_key_fields(key), text=lambda: "\n".join(f"{k}: {v}".rstrip() for k, v in _key_row(key).items()))

    def keys(self, keys: Sequence[Key]) -> None:
        if self.field:
            self._check_field([f.name for f in dataclass_fields(Key)])  # also for an empty list
            for key in keys:
                print(self._pick(_key_fields(key)))
        elif self.as_json:
            print(json.dumps([_key_fields(k) for k in keys], indent=2))
        else:
            print(_table([_key_row(k) for k in keys]))

    def versions(self, versions: Sequence[KeyVersion]) -> None:
        if self.field:
            self._check_field([f.name for f in dataclass_fields(KeyVersion)])  # also for an empty list
            for version in versions:
                print(self._pick(_plain(asdict(version))))
        elif self.as_json:
            print(json.dumps([_plain(asdict(v)) for v in versions], indent=2))
        else:
            print(_table([_version_row(v) for v in versions]))

    def records(self, rows: Sequence[dict[str, Any]], names: Sequence[str]) -> None:
        """A list of records of the given field names (a JSON list, a table, or one field per line)."""
        if self.field:
            self._check_field(names)
            for row in rows:
                print(_raw(row[str(self.field)]))
        elif self.as_json:
            print(json.dumps(list(rows), indent=2, default=str))
        else:
            print(_table([{name: _raw(row[name]) for name in names} for row in rows]))


_AUDIT_FIELDS = ("time", "principal", "rpc", "key_id", "key_version", "outcome", "phase", "request_id")


def _audit(args: argparse.Namespace, client: CryptoClient, out: Output) -> None:
    """The tenant's latest audit records (ReadAuditLog; the caller needs audit_read)."""
    records = [
        {name: getattr(record, name) for name in _AUDIT_FIELDS}
        for record in client.read_audit_log(tenant_id=args.tenant)
    ]
    out.records(records[-max(1, args.lines) :], _AUDIT_FIELDS)


def _audit_verify() -> int:
    """`cryptoctl audit verify`: the server's own verifier, which needs the root key (it derives the chain key);
    so it runs where the server package and its settings are, like crypto-audit verify."""
    try:
        from crypto_server import audit_cli
    except ImportError:
        return _fail(
            "audit verify needs the server package (caas-crypto-server) and the server's settings (the root key): "
            "run it on a server host, or use crypto-audit verify there",
            EXIT_USAGE,
        )
    return audit_cli.main(["verify"])


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator:
            raise UsageError(f"--label takes NAME=VALUE, got {pair!r}")
        labels[name] = value
    return labels


@contextmanager
def _progress(total: int | None, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """Bytes, throughput and ETA on stderr, only when stderr is a terminal (never in logs or pipes)."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # imported only for a terminal: it costs start-up time otherwise

    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr) as bar:

        def show(done: int) -> None:
            bar.update(done - bar.n)

        yield show


def _open_in(path: str | None, stack: ExitStack) -> tuple[BinaryIO, int | None]:
    if path in (None, "-"):
        return sys.stdin.buffer, None
    try:
        source: BinaryIO = stack.enter_context(Path(path).open("rb"))  # noqa: SIM115 (the stack closes it)
        return source, os.fstat(source.fileno()).st_size
    except OSError as error:
        raise FileError(f"cannot read --in {path}: {error.strerror}") from None


def _check_output_path(path: str) -> Path:
    destination = Path(path)
    if not destination.parent.is_dir():
        raise FileError(f"cannot write --out {path}: directory {destination.parent} does not exist")
    if destination.is_dir():
        raise FileError(f"cannot write --out {path}: it is a directory")
    return destination


def _refuse_value_ciphertext_as_file(source: BinaryIO) -> None:
    """Name the mix-up instead of the service's generic 'could not be decrypted'."""
    peek = getattr(source, "peek", None)
    head: bytes = peek(8)[:8] if peek else b""
    if head[:1] == bytes([_VALUE_FORMAT]):
        raise WrongInput(f"the input is not a file ciphertext: {_USE_VALUE}")
    try:
        decoded = base64.b64decode(head, validate=True) if len(head) == 8 else b""
    except binascii.Error:
        decoded = b""
    if decoded[:1] == bytes([_VALUE_FORMAT]):
        raise WrongInput(f"the input is base64 text, not a file ciphertext: {_USE_VALUE}")


def _keys(args: argparse.Namespace, client: CryptoClient, out: Output) -> None:
    if args.action == "create":
        out.key(
            client.create_key(
                KeyType[args.type.upper()],
                algorithm=_ALGORITHMS[args.algorithm],
                expire_after=timedelta(seconds=args.expire_after) if args.expire_after else None,
                rotation_period=timedelta(seconds=args.rotation_period) if args.rotation_period else None,
                labels=_labels(args.label),
            )
        )
    elif args.action == "export":
        _export_key(args, client, out)
    elif args.action == "import":
        out.key(client.import_key(_read_file(args.input, "--in")))
    elif args.action == "list":
        key_type = KeyType[args.type.upper()] if args.type else None
        state = KeyState[args.state.upper()] if args.state else None
        out.keys(list(client.list_keys(key_type=key_type, state=state)))
    elif args.action == "versions":
        out.versions(list(client.iter_key_versions(args.key_id)))
    elif args.action == "schedule-destruction":
        waiting = timedelta(days=args.waiting_days) if args.waiting_days is not None else None
        out.key(client.schedule_key_destruction(args.key_id, version=args.version, waiting_period=waiting))
    elif args.action == "cancel-destruction":
        out.key(client.cancel_key_destruction(args.key_id, version=args.version))
    elif args.action in ("disable-version", "enable-version"):
        toggle = client.disable_key_version if args.action == "disable-version" else client.enable_key_version
        out.key(toggle(args.key_id, args.version))
    else:
        action: Callable[[str], Key] = {
            "get": lambda k: client.get_key(k, use_cache=False),
            "rotate": client.rotate_key,
            "disable": client.disable_key,
            "enable": client.enable_key,
        }[args.action]
        out.key(action(args.key_id))


def _read_file(path: str, option: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise FileError(f"cannot read {option} {path}: {error.strerror}") from None


def _export_key(args: argparse.Namespace, client: CryptoClient, out: Output) -> None:
    """ExportKey, the backup written to --out (created with mode 0600, renamed into place when complete)."""
    if bool(args.backup_public_key) == bool(args.root_key):
        raise UsageError("keys export needs --backup-public-key FILE or --root-key (one of them)")
    destination = _check_output_path(args.output)
    public_key = _read_file(args.backup_public_key, "--backup-public-key") if args.backup_public_key else None
    key, backup = client.export_key(args.key_id, backup_public_key=public_key)
    try:
        write_atomically(destination, lambda file: file.write(backup))
    except OSError as error:
        raise FileError(f"cannot write --out {args.output}: {error.strerror}") from None
    out.one({"key_id": key.key_id, "versions": key.version_count, "backup": str(destination), "bytes": len(backup)})


def _encrypt_value(args: argparse.Namespace, client: CryptoClient, out: Output) -> None:
    if args.value_base64 is not None:
        try:
            plaintext = base64.b64decode(args.value_base64, validate=True)
        except binascii.Error:
            raise UsageError("--value-base64 is not valid base64") from None
    else:
        plaintext = args.value.encode()
    sealed = client.encrypt(args.key, plaintext, aad=args.aad.encode())
    ciphertext = base64.b64encode(sealed.ciphertext).decode()
    out.one({"ciphertext": ciphertext, "key_id": sealed.key_id, "key_version": sealed.key_version})


def _decrypt_value(args: argparse.Namespace, client: CryptoClient, out: Output) -> None:
    try:
        ciphertext = base64.b64decode(args.value, validate=True)
    except binascii.Error:
        raise WrongInput("--value must be the base64 ciphertext printed by encrypt --value") from None
    if ciphertext[:1] == bytes([_STREAM_FORMAT]):
        raise WrongInput(f"--value is not a value ciphertext: {_USE_FILE}")
    destination = _check_output_path(args.output) if args.output not in (None, "-") else None
    opened = client.decrypt(ciphertext, aad=args.aad.encode(), key_id=args.key)
    if destination is not None:
        write_atomically(destination, lambda file: file.write(opened.plaintext))
        return
    if args.raw or args.output == "-":
        sys.stdout.buffer.write(opened.plaintext)
        sys.stdout.buffer.flush()
        return
    if args.text:
        try:
            plaintext = opened.plaintext.decode()
        except UnicodeDecodeError:
            raise WrongInput(
                "the plaintext is not UTF-8 text: leave out --text (base64), or use --raw or --out"
            ) from None
    else:
        plaintext = base64.b64encode(opened.plaintext).decode()
    out.one({"plaintext": plaintext, "key_id": opened.key_id, "key_version": opened.key_version})


def _transform_file(args: argparse.Namespace, client: CryptoClient) -> None:
    aad = args.aad.encode()
    destination = _check_output_path(args.output) if args.output not in (None, "-") else None
    files = FileCipher(client, args.key or "")
    transform = files.encrypt if args.command == "encrypt" else files.decrypt
    with ExitStack() as stack:
        source, size = _open_in(args.input, stack)
        if args.command == "decrypt":
            _refuse_value_ciphertext_as_file(source)
        progress = stack.enter_context(_progress(size, not args.no_progress))
        if destination is None:
            transform(source, sys.stdout.buffer, aad=aad, progress=progress)
            sys.stdout.buffer.flush()
        else:
            # Through a temporary file, renamed when complete: a failed decryption leaves nothing behind.
            try:
                write_atomically(destination, lambda file: transform(source, file, aad=aad, progress=progress))
            except OSError as error:
                raise FileError(f"cannot write --out {args.output}: {error.strerror}") from None


def _run(args: argparse.Namespace, client: CryptoClient, out: Output) -> int:
    if args.command == "health":
        status = client.health(args.service)
        out.one({"status": status.value})
        return EXIT_OK if status is HealthStatus.SERVING else EXIT_NOT_SERVING
    if args.command == "keys":
        _keys(args, client, out)
    elif args.command == "audit":
        _audit(args, client, out)
    elif args.value is not None or getattr(args, "value_base64", None) is not None:
        if args.input is not None:
            raise UsageError("give --value or --in, not both")
        (_encrypt_value if args.command == "encrypt" else _decrypt_value)(args, client, out)
    elif args.command == "decrypt" and (args.text or args.raw):
        raise UsageError("--text and --raw apply to --value; a file's plaintext is written as it is")
    else:
        _transform_file(args, client)
    return EXIT_OK


def _global_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """The options every command takes, before or after its name.

    On the subcommands their default is SUPPRESS, so an option given before the command is not reset by the
    subcommand's parser; the real defaults are filled in by `_defaults` afterwards.
    """

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    parser.add_argument(
        "--target", default=default(None), help="host:port of the service (default $CRYPTO_TARGET or localhost:3009)"
    )
    parser.add_argument("--tenant", default=default(None), help="tenant id (default $CRYPTO_TENANT)")
    parser.add_argument(
        "--json", action="store_true", default=default(False), help="JSON: one object per result, a list for lists"
    )
    parser.add_argument(
        "-f", "--field", default=default(None), metavar="NAME", help="print only this field's value, raw"
    )
    parser.add_argument(
        "--timeout", type=float, default=default(10.0), metavar="SECONDS", help="deadline per call (not for files)"
    )
    parser.add_argument("--ca", default=default(None), metavar="PEM", help="TLS: the server's CA ($CRYPTO_CA_FILE)")
    parser.add_argument(
        "--cert", default=default(None), metavar="PEM", help="mTLS: client certificate ($CRYPTO_CERT_FILE)"
    )
    # Not --key: encrypt and decrypt take --key for the key id.
    parser.add_argument(
        "--client-key", default=default(None), metavar="PEM", help="mTLS: the --cert's private key ($CRYPTO_KEY_FILE)"
    )
    parser.add_argument(
        "--token", default=default(None), help="bearer token (JWT) sent with every call ($CRYPTO_TOKEN)"
    )


def parser() -> argparse.ArgumentParser:
    root = _Parser(prog="cryptoctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(root, suppress=False)
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(group: Any, name: str, help_text: str) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = group.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, suppress=True)
        return sub

    keys = command(commands, "keys", "create, list, get, rotate, disable, enable, export, import keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = command(keys, "create", "create a key")
    create.add_argument("--type", choices=["data", "session", "master"], default="data", help="key type (data)")
    create.add_argument("--algorithm", choices=sorted(_ALGORITHMS), default="aes-256-gcm", help="(aes-256-gcm)")
    create.add_argument("--expire-after", type=float, metavar="SECONDS", help="the key expires after this long")
    create.add_argument("--rotation-period", type=float, metavar="SECONDS", help="rotate automatically this often")
    create.add_argument("--label", action="append", default=[], metavar="NAME=VALUE", help="a label (repeatable)")
    listing = command(keys, "list", "list the tenant's keys")
    listing.add_argument("--type", choices=["data", "session", "master"], help="only keys of this type")
    listing.add_argument("--state", choices=["enabled", "disabled", "expired"], help="only keys in this state")
    for action, help_text in (
        ("get", "show a key"),
        ("rotate", "add a new primary version"),
        ("disable", "refuse all use of a key"),
        ("enable", "allow a disabled key again"),
    ):
        command(keys, action, help_text).add_argument("key_id", help="the key's id")
    schedule = command(
        keys, "schedule-destruction", "destroy a key (or one --version) after a waiting period; cancellable until then"
    )
    schedule.add_argument("key_id", help="the key's id")
    schedule.add_argument("--version", type=int, default=0, help="only this version (not the primary); 0: the key")
    schedule.add_argument("--waiting-days", type=float, metavar="DAYS", help="1 to 30 days (7)")
    cancel = command(keys, "cancel-destruction", "cancel a scheduled destruction before it runs")
    cancel.add_argument("key_id", help="the key's id")
    cancel.add_argument("--version", type=int, default=0, help="only this version; 0: every scheduled version")
    for action, help_text in (
        ("disable-version", "refuse all use of one version (not the primary)"),
        ("enable-version", "allow a disabled version again"),
    ):
        toggled = command(keys, action, help_text)
        toggled.add_argument("key_id", help="the key's id")
        toggled.add_argument("version", type=int, help="the version")
    export = command(keys, "export", "write a backup of a key with all its versions to a file (needs admin)")
    export.add_argument("key_id", help="the key's id")
    export.add_argument("--out", dest="output", required=True, metavar="FILE", help="where to write the backup")
    wrapping = export.add_mutually_exclusive_group()
    wrapping.add_argument(
        "--backup-public-key", metavar="PEM", help="encrypt for this public key (RSA 3072 or X25519, PEM file)"
    )
    wrapping.add_argument(
        "--root-key", action="store_true", help="encrypt under the server's root key (same-deployment restore)"
    )
    restore = command(keys, "import", "restore a key from a backup file (needs admin)")
    restore.add_argument("--in", dest="input", required=True, metavar="FILE", help="a backup from keys export")
    versions = command(keys, "versions", "list every version of a key, oldest first, with its state")
    versions.add_argument("key_id", help="the key's id")

    for name, help_text in (
        ("encrypt", "encrypt a value (--value) or a file (--in/--out, stdin/stdout by default)"),
        ("decrypt", "decrypt a value (--value) or a file (--in/--out, stdin/stdout by default)"),
    ):
        sub = command(commands, name, help_text)
        if name == "encrypt":
            sub.add_argument("--key", help="the key to encrypt with (required)")
            given = sub.add_mutually_exclusive_group()
            given.add_argument("--value", help="a text value (UTF-8) instead of a file")
            given.add_argument("--value-base64", metavar="BASE64", help="a binary value, base64-encoded")
        else:
            sub.add_argument("--key", help="the key the ciphertext must be under (checked, optional)")
            sub.add_argument("--value", metavar="BASE64", help="a ciphertext printed by encrypt --value")
            shown = sub.add_mutually_exclusive_group()
            shown.add_argument("--text", action="store_true", help="--value: print the plaintext as UTF-8 text")
            shown.add_argument("--raw", action="store_true", help="--value: write the plaintext bytes to stdout")
        sub.add_argument("--aad", default="", help="associated data (text); decrypt needs the same")
        sub.add_argument("--in", dest="input", metavar="FILE", help="input file, or - for stdin (the default)")
        sub.add_argument("--out", dest="output", metavar="FILE", help="output file, or - for stdout (the default)")
        sub.add_argument("--no-progress", action="store_true", help="no progress bar (shown on a terminal only)")
    audit = command(
        commands, "audit", "the audit trail: the tenant's latest records, or verify the chains"
    ).add_subparsers(dest="action", required=True, metavar="ACTION")
    tail = command(audit, "tail", "the tenant's latest audit records (ReadAuditLog; needs audit_read)")
    tail.add_argument("-n", "--lines", type=int, default=20, help="how many records (20)")
    command(audit, "verify", "verify every audit chain (runs crypto-audit verify: needs the server's settings)")
    health = command(commands, "health", "gRPC health check of the service")
    health.add_argument("--service", default="", help="a service name, e.g. caas.crypto.v1.KeyService (all)")
    return root


def _defaults(args: argparse.Namespace) -> argparse.Namespace:
    args.target = args.target or os.environ.get("CRYPTO_TARGET", "localhost:3009")
    args.tenant = args.tenant if args.tenant is not None else os.environ.get("CRYPTO_TENANT", "")
    args.ca = args.ca or os.environ.get("CRYPTO_CA_FILE") or None
    args.cert = args.cert or os.environ.get("CRYPTO_CERT_FILE") or None
    args.client_key = args.client_key or os.environ.get("CRYPTO_KEY_FILE") or None
    args.token = args.token or os.environ.get("CRYPTO_TOKEN") or None
    if args.command == "encrypt" and not args.key:
        raise UsageError("encrypt needs --key")
    if args.command != "health" and not args.tenant:
        raise UsageError("--tenant (or $CRYPTO_TENANT) is required")
    return args


def _client_config(args: argparse.Namespace) -> ClientConfig:
    """TLS when a CA or a client certificate is given (mTLS with --cert/--key), a bearer token with --token."""
    credentials = None
    if args.ca or args.cert or args.client_key:
        credentials = tls_credentials(args.ca, args.cert, args.client_key)
    token: str | None = args.token
    return ClientConfig(
        timeout_s=args.timeout, credentials=credentials, token_provider=(lambda: token) if token else None
    )


def _exit_code(error: CryptoClientError) -> int:
    if isinstance(error, KeyNotFoundError):
        return EXIT_NOT_FOUND
    if isinstance(error, InvalidArgumentError | DecryptionError):
        return EXIT_INVALID
    if isinstance(error, FailedPreconditionError):
        return EXIT_PRECONDITION
    if isinstance(error, ServiceUnavailableError | DeadlineExceededError):
        return EXIT_UNAVAILABLE
    return EXIT_ERROR


def _fail(message: str, code: int) -> int:
    print(f"cryptoctl: {message}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
        if args.command == "audit" and args.action == "verify":
            return _audit_verify()
        args = _defaults(args)
        config = _client_config(args)
        with CryptoClient(args.target, args.tenant or "health", config) as client:
            return _run(args, client, Output(args.json, args.field))
    except BrokenPipeError:
        # The reader left (`| head`): stop quietly, and keep the interpreter's final flush from failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except (UsageError, ValueError) as error:
        return _fail(str(error), EXIT_USAGE)
    except WrongInput as error:
        return _fail(str(error), EXIT_INVALID)
    except (FileError, OSError) as error:
        return _fail(str(error), EXIT_FILE)
    except CryptoClientError as error:
        return _fail(str(error), _exit_code(error))
    except KeyboardInterrupt:
        return _fail("interrupted", 128 + 2)
    except Exception as error:  # a defect: still one line for the user, not a traceback
        return _fail(f"unexpected error ({type(error).__name__}): {error}", EXIT_ERROR)


if __name__ == "__main__":
    raise SystemExit(main())
