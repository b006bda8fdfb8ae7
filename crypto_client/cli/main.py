"""cryptoctl — manage keys, encrypt and decrypt values or files of any size, check health.

    cryptoctl --tenant acme keys create --label team=media
    cryptoctl --tenant acme keys list --json
    cryptoctl --tenant acme encrypt --key KEY_ID --value "hello"
    cryptoctl --tenant acme encrypt --key KEY_ID --in video.mp4 --out video.mp4.enc
    cat video.mp4.enc | cryptoctl --tenant acme decrypt --key KEY_ID > video.mp4
    cryptoctl health

Target and tenant default to $CRYPTO_TARGET (localhost:3009) and $CRYPTO_TENANT.

Exit codes: 0 success; 2 usage; 3 not found; 4 invalid argument or undecryptable input; 5 the key's state
forbids it (disabled, expired, wrong type or algorithm); 6 service unavailable, circuit open or deadline
exceeded; 7 not serving (health); 1 any other error.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import Any, BinaryIO

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
    ServiceUnavailableError,
)
from crypto_client.files import write_atomically

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INVALID, EXIT_PRECONDITION, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5, 6
EXIT_NOT_SERVING = 7
_ALGORITHMS = {
    "aes-256-gcm": Algorithm.AES_256_GCM,
    "hmac-sha256": Algorithm.HMAC_SHA256,
    "ed25519": Algorithm.ED25519,
    "ecdsa-p256": Algorithm.ECDSA_P256_SHA256,
}


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


def _table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(none)"
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    lines = ["  ".join(c.upper().ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(r[c]).ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


class Output:
    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def keys(self, keys: Sequence[Key]) -> None:
        if self.as_json:
            print(json.dumps([_plain(asdict(k)) for k in keys], indent=2))
        else:
            print(_table([_key_row(k) for k in keys]))

    def value(self, **fields: Any) -> None:
        if self.as_json:
            print(json.dumps(_plain(fields)))
        else:
            print("\n".join(f"{name}: {value}" for name, value in fields.items()))


def _labels(pairs: Sequence[str]) -> dict[str, str]:
    labels = {}
    for pair in pairs:
        name, separator, value = pair.partition("=")
        if not separator:
            raise SystemExit(f"cryptoctl: --label takes NAME=VALUE, got {pair!r}")
        labels[name] = value
    return labels


def _progress(total: int | None) -> Callable[[int], None] | None:
    if not sys.stderr.isatty():
        return None

    def show(done: int) -> None:
        if total:
            filled = int(30 * done / total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {100 * done // total:3d}% ")
        else:
            sys.stderr.write(f"\r{done // (1024 * 1024)} MiB ")
        sys.stderr.flush()

    return show


def _open_in(path: str | None) -> tuple[BinaryIO, int | None]:
    if path in (None, "-"):
        return sys.stdin.buffer, None
    file = Path(path)
    return file.open("rb"), file.stat().st_size


def _run(args: argparse.Namespace, client: CryptoClient, out: Output) -> int:
    if args.command == "health":
        status = client.health(args.service)
        out.value(status=status.value)
        return EXIT_OK if status is HealthStatus.SERVING else EXIT_NOT_SERVING
    if args.command == "keys":
        if args.action == "create":
            key = client.create_key(
                KeyType[args.type.upper()],
                algorithm=_ALGORITHMS[args.algorithm],
                expire_after=timedelta(seconds=args.expire_after) if args.expire_after else None,
                rotation_period=timedelta(seconds=args.rotation_period) if args.rotation_period else None,
                labels=_labels(args.label),
            )
            out.keys([key])
        elif args.action == "list":
            out.keys(
                list(
                    client.list_keys(
                        key_type=KeyType[args.type.upper()] if args.type else None,
                        state=KeyState[args.state.upper()] if args.state else None,
                    )
                )
            )
        else:
            action: Callable[[str], Key] = {
                "get": lambda k: client.get_key(k, use_cache=False),
                "rotate": client.rotate_key,
                "disable": client.disable_key,
                "enable": client.enable_key,
            }[args.action]
            out.keys([action(args.key_id)])
        return EXIT_OK
    aad = args.aad.encode()
    if args.command == "encrypt" and args.value is not None:
        sealed = client.encrypt(args.key, args.value.encode(), aad=aad)
        out.value(
            ciphertext=base64.b64encode(sealed.ciphertext).decode(),
            key_id=sealed.key_id,
            key_version=sealed.key_version,
        )
        return EXIT_OK
    if args.command == "decrypt" and args.value is not None:
        try:
            ciphertext = base64.b64decode(args.value, validate=True)
        except binascii.Error:
            raise DecryptionError("--value must be the base64 ciphertext printed by encrypt") from None
        opened = client.decrypt(ciphertext, aad=aad, key_id=args.key)
        out.value(
            plaintext=opened.plaintext.decode(errors="replace"), key_id=opened.key_id, key_version=opened.key_version
        )
        return EXIT_OK
    if args.command == "encrypt" and not args.key:
        raise SystemExit("cryptoctl: encrypt needs --key")
    source, size = _open_in(args.input)
    files = FileCipher(client, args.key or "")
    transform = files.encrypt if args.command == "encrypt" else files.decrypt
    progress = None if args.no_progress else _progress(size)
    try:
        if args.output in (None, "-"):
            transform(source, sys.stdout.buffer, aad=aad, progress=progress)
            sys.stdout.buffer.flush()
        else:
            # Through a temporary file, renamed when complete: a failed decryption leaves nothing behind.
            write_atomically(Path(args.output), lambda out: transform(source, out, aad=aad, progress=progress))
    finally:
        if source is not sys.stdin.buffer:
            source.close()
        if progress is not None:
            sys.stderr.write("\n")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="cryptoctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    root.add_argument("--target", default=os.environ.get("CRYPTO_TARGET", "localhost:3009"))
    root.add_argument("--tenant", default=os.environ.get("CRYPTO_TENANT", ""))
    root.add_argument("--json", action="store_true", help="machine-readable output")
    root.add_argument("--timeout", type=float, default=10.0, help="seconds per call (not for files)")
    commands = root.add_subparsers(dest="command", required=True)

    keys = commands.add_parser("keys", help="key management").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create")
    create.add_argument("--type", choices=["data", "session", "master"], default="data")
    create.add_argument("--algorithm", choices=sorted(_ALGORITHMS), default="aes-256-gcm")
    create.add_argument("--expire-after", type=float, metavar="SECONDS")
    create.add_argument("--rotation-period", type=float, metavar="SECONDS")
    create.add_argument("--label", action="append", default=[], metavar="NAME=VALUE")
    listing = keys.add_parser("list")
    listing.add_argument("--type", choices=["data", "session", "master"])
    listing.add_argument("--state", choices=["enabled", "disabled", "expired"])
    for action in ("get", "rotate", "disable", "enable"):
        keys.add_parser(action).add_argument("key_id")

    for name in ("encrypt", "decrypt"):
        command = commands.add_parser(name, help=f"{name} a value or a file (stdin/stdout by default)")
        command.add_argument("--key", help="the key (required to encrypt; checked when decrypting)")
        command.add_argument("--aad", default="", help="associated data (text)")
        command.add_argument("--value", help="a value instead of a file (decrypt: the base64 ciphertext)")
        command.add_argument("--in", dest="input", help="input file, or - for stdin")
        command.add_argument("--out", dest="output", help="output file, or - for stdout")
        command.add_argument("--no-progress", action="store_true")
    health = commands.add_parser("health", help="gRPC health check")
    health.add_argument("--service", default="")
    return root


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command != "health" and not args.tenant:
        print("cryptoctl: --tenant (or $CRYPTO_TENANT) is required", file=sys.stderr)
        return EXIT_USAGE
    out = Output(args.json)
    try:
        with CryptoClient(args.target, args.tenant or "health", ClientConfig(timeout_s=args.timeout)) as client:
            return _run(args, client, out)
    except ValueError as error:
        print(f"cryptoctl: {error}", file=sys.stderr)
        return EXIT_USAGE
    except CryptoClientError as error:
        print(f"cryptoctl: {error}", file=sys.stderr)
        if isinstance(error, KeyNotFoundError):
            return EXIT_NOT_FOUND
        if isinstance(error, InvalidArgumentError | DecryptionError):
            return EXIT_INVALID
        if isinstance(error, FailedPreconditionError):
            return EXIT_PRECONDITION
        if isinstance(error, ServiceUnavailableError | DeadlineExceededError):
            return EXIT_UNAVAILABLE
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
