"""`crypto-rewrap-root`: re-wrap every stored secret under a new root key (root key rotation).

The procedure (docs/operations.md), with no downtime:

1. Roll out every replica with CRYPTO_ROOT_KEY_FILE=<old> and CRYPTO_OTHER_ROOT_KEY_FILE=<new>.
2. Roll out every replica with CRYPTO_ROOT_KEY_FILE=<new> and CRYPTO_OTHER_ROOT_KEY_FILE=<old>:
   each replica unwraps under either, and wraps new master keys under the new one.
3. Run this command with the same two variables: every secret wrapped under the old root key is re-wrapped
   under the new one (same material, so nothing else changes), then the store records the new root key as
   its own.
4. Roll out every replica with CRYPTO_ROOT_KEY_FILE=<new> only, and retire the old key.

Either key may be in an HSM instead (docs/operations.md, "The root key in an HSM"): the new one with
CRYPTO_ROOT_KEY_PROVIDER=pkcs11 and CRYPTO_PKCS11_KEY_LABEL, the old one with CRYPTO_PKCS11_OTHER_KEY_LABEL, so
the same steps move a store from a file key into an HSM and back.

Before it writes anything it proves that the old key is the store's root key (the store's check value opens
under it), that the two keys differ, and that every stored secret opens under one of them; then it shows
both keys' fingerprints (the replicas log theirs at start-up as "root key loaded") and needs `--yes` or a
"yes" typed at a terminal. Resumable: secrets already under the new key are skipped, and the store's check
value moves to the new key last.
"""

from __future__ import annotations

import argparse
import hmac
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

from crypto_server.app import OpenedStore, open_key_store
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.errors import ConcurrentModification, KeyIntegrityError, RootKeyUnavailable, StoreUnavailable
from crypto_server.domain.key_integrity import METADATA_KEY_RECORD, unwrap_metadata_key, wrap_metadata_key
from crypto_server.domain.key_wrap import (
    UnwrapFailed,
    WrappingContext,
    make_root_key_check,
    root_key_matches,
    wrap_key,
)
from crypto_server.root_key import RootKey, load_other_root_key, load_root_key
from crypto_server.service.keyring import unwrap_version
from crypto_server.storage.port import RootKeyChecks

PROGRAM = "crypto-rewrap-root"
EXIT_DONE = 0
EXIT_STOPPED = 1
EXIT_REFUSED = 2

_EPILOG = """\
environment:
  CRYPTO_ROOT_KEY_FILE        the NEW root key (the one every replica now wraps with)
  CRYPTO_OTHER_ROOT_KEY_FILE  the OLD root key (the one the store's check value names)
  CRYPTO_ROOT_KEY_PROVIDER=pkcs11 with CRYPTO_PKCS11_KEY_LABEL: the NEW root key is in an HSM
  CRYPTO_PKCS11_OTHER_KEY_LABEL: the OLD root key is in an HSM
  (with either: CRYPTO_PKCS11_LIBRARY, CRYPTO_PKCS11_TOKEN_LABEL, CRYPTO_PKCS11_PIN_FILE)
  MONGODB_URI, MONGODB_DATABASE, REDIS_URL, CRYPTO_DATA_DIR: the store, as the replicas have them

exit codes:
  0  done; or --dry-run; or nothing to do (the store holds no keys)
  1  stopped: the store became unreachable, or a key changed while it was being re-wrapped. What was
     re-wrapped stays valid (replicas unwrap under either key); run it again.
  2  refused, nothing written: bad settings or usage, the old key is not the store's root key, the keys
     are the same, the store has keys but no check value, a secret opens under neither key (the new key
     is not the one the replicas use), or no --yes / confirmation.
"""


class Refused(Exception):
    """A safety check failed before anything was written."""


@dataclass(frozen=True)
class RootKeys:
    old: RootKey
    new: RootKey


@dataclass(frozen=True)
class SecretCount:
    """One kind of stored secret: how many are re-wrapped (with --dry-run: would be), how many were already."""

    rewrapped: int = 0
    already_rewrapped: int = 0


class StoredSecretRewrap(Protocol):
    def __call__(self, store: OpenedStore, keys: RootKeys, *, write: bool) -> SecretCount:
        """Re-wrap (when `write`) every secret of one kind from keys.old to keys.new, and count them.

        Raises KeyIntegrityError for a secret that opens under neither key, ConcurrentModification when one
        changed while it was being re-wrapped.
        """
        ...


def rewrap_master_key_versions(store: OpenedStore, keys: RootKeys, *, write: bool) -> SecretCount:
    """Master key versions: the key material wrapped directly under the root key."""
    rewrapped = already = 0
    for key in store.key_records.master_keys():
        for record in key.versions:
            if record.destroyed:
                continue  # nothing left to re-wrap (a destroyed tenant)
            try:
                unwrap_version(keys.new, key, record)
                already += 1
                continue
            except UnwrapFailed:
                pass
            try:
                material = unwrap_version(keys.old, key, record)
            except UnwrapFailed:
                raise KeyIntegrityError(
                    f"master key {key.key_id} version {record.version} opens under neither root key"
                ) from None
            if write:
                wrapped = wrap_key(keys.new, material, WrappingContext.of(key, record))
                if not store.key_records.replace_wrapped_material(
                    key.tenant_id, key.key_id, record.version, record.wrapped_material, wrapped
                ):
                    raise ConcurrentModification(f"master key {key.key_id} changed during the re-wrap; run it again")
            rewrapped += 1
    return SecretCount(rewrapped, already)


def rewrap_metadata_key(store: OpenedStore, keys: RootKeys, *, write: bool) -> SecretCount:
    """The key that authenticates key metadata (domain/key_integrity.py), one per store."""
    wrapped = store.database.get_meta(METADATA_KEY_RECORD)
    if wrapped is None:
        return SecretCount()
    if unwrap_metadata_key((keys.new,), wrapped) is not None:
        return SecretCount(already_rewrapped=1)
    metadata_key = unwrap_metadata_key((keys.old,), wrapped)
    if metadata_key is None:
        raise KeyIntegrityError("the store's metadata key opens under neither root key")
    if write:
        store.database.replace_meta(METADATA_KEY_RECORD, wrap_metadata_key(keys.new, metadata_key))
    return SecretCount(rewrapped=1)


# Every kind of secret the store keeps wrapped under the root key, by its name in the report.
# Another kind is one more function of the StoredSecretRewrap shape, added here.
STORED_SECRETS: dict[str, StoredSecretRewrap] = {
    "master_key_versions": rewrap_master_key_versions,
    "metadata_key": rewrap_metadata_key,
}


def rewrap_stored_secrets(store: OpenedStore, keys: RootKeys, *, write: bool) -> dict[str, SecretCount]:
    """Every kind in STORED_SECRETS; when `write`, the store's check value then names the new key."""
    counts = {name: rewrap(store, keys, write=write) for name, rewrap in STORED_SECRETS.items()}
    if write:
        store.database.replace_root_key_check(make_root_key_check(keys.new))
    return counts


def verify_root_keys(store: RootKeyChecks, old: RootKey, new: RootKey) -> RootKeys | None:
    """The two keys, once proven safe to re-wrap from `old` to `new`; None when the store holds no keys at all.

    Raises Refused when `old` is not the store's root key (its check value does not open under it), when the
    keys are the same, or when the store holds keys but no check value to prove which key wrapped them.
    """
    # Equal fingerprints: the same key (64 bits of a MAC under each key; two different keys collide with a
    # chance of 2^-64). A file key and an HSM key are fingerprinted differently, and are different keys anyway.
    if hmac.compare_digest(old.fingerprint, new.fingerprint):
        raise Refused("CRYPTO_OTHER_ROOT_KEY_FILE (old) and CRYPTO_ROOT_KEY_FILE (new) hold the same key")
    keys = RootKeys(old=old, new=new)
    check = store.get_root_key_check()
    if check is None:
        if not store.has_keys():
            return None
        raise Refused(
            "the store holds keys but no root key check value, so nothing proves which root key wrapped them; "
            "start one server on the old root key alone (it records the check value), then run this again"
        )
    old_name, new_name = old.fingerprint, new.fingerprint
    if root_key_matches(keys.old, check):
        return keys
    if root_key_matches(keys.new, check):
        raise Refused(
            f"the store's root key is the NEW key {new_name} (CRYPTO_ROOT_KEY_FILE), not the old key {old_name} "
            "(CRYPTO_OTHER_ROOT_KEY_FILE): either the re-wrap has completed already, or the two variables are swapped"
        )
    raise Refused(
        f"the old key {old_name} (CRYPTO_OTHER_ROOT_KEY_FILE) is not the store's root key, "
        f"and neither is the new key {new_name}: check both files and the store settings"
    )


def _confirmed(prompt: str) -> bool:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    try:
        answer = sys.stdin.readline()
    except KeyboardInterrupt:
        return False
    return answer.strip().lower() == "yes"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM,
        description=(
            "Re-wrap every master key version and the metadata key from the old root key\n"
            "(CRYPTO_OTHER_ROOT_KEY_FILE) to the new one (CRYPTO_ROOT_KEY_FILE), then record the new key as the\n"
            "store's root key. Step 3 of the root key rotation in docs/operations.md. Checks everything before\n"
            "it writes anything."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="check and count what would change; write nothing")
    parser.add_argument("--yes", action="store_true", help="write without asking (needed when stdin is no terminal)")
    return parser


def _report(counts: dict[str, SecretCount], old: RootKey, new: RootKey, *, dry_run: bool) -> str:
    return json.dumps(
        {
            "dry_run": dry_run,
            "old_root_key": old.fingerprint,
            "new_root_key": new.fingerprint,
            **{name: asdict(count) for name, count in counts.items()},
        }
    )


def _run(store: OpenedStore, old: RootKey, new: RootKey, *, dry_run: bool, yes: bool) -> int:
    keys = verify_root_keys(store.database, old, new)
    if keys is None:
        print(f"{PROGRAM}: the store holds no keys; nothing to re-wrap", file=sys.stderr)
        return EXIT_DONE
    try:
        counts = rewrap_stored_secrets(store, keys, write=False)
    except KeyIntegrityError as error:
        # The old key is proven to be the store's, so a secret under neither key was wrapped by a replica under
        # a root key that is not this new one.
        raise Refused(
            f"{error.message}: if a replica wrapped it, the replicas use a root key that is not the new key "
            f'{new.fingerprint} (CRYPTO_ROOT_KEY_FILE); compare it with their "root key loaded" log line'
        ) from None
    if dry_run:
        print(_report(counts, old, new, dry_run=True))
        return EXIT_DONE
    to_rewrap = ", ".join(f"{count.rewrapped} {name}" for name, count in counts.items())
    summary = (
        f"{PROGRAM}: re-wrap {to_rewrap} from root key {old.fingerprint} to root key "
        f'{new.fingerprint}; the replicas must log "root key loaded" with fingerprint '
        f"{new.fingerprint}"
    )
    if not any(count.already_rewrapped for count in counts.values()):
        summary += " (nothing in the store is wrapped under the new key yet, so only that log line can show it)"
    if not yes:
        if not sys.stdin.isatty():
            raise Refused("writing needs --yes, or a terminal to confirm on (--dry-run shows what would change)")
        if not _confirmed(f"{summary}\nType yes to re-wrap: "):
            raise Refused("not confirmed; nothing written")
    else:
        print(summary, file=sys.stderr)
    counts = rewrap_stored_secrets(store, keys, write=True)
    print(_report(counts, old, new, dry_run=False))
    return EXIT_DONE


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: see _EPILOG (`crypto-rewrap-root --help`)."""
    arguments = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if not settings.has_other_root_key:
            raise ConfigError(
                "set CRYPTO_OTHER_ROOT_KEY_FILE (or CRYPTO_PKCS11_OTHER_KEY_LABEL) to the old root key, "
                "CRYPTO_ROOT_KEY_FILE (or CRYPTO_ROOT_KEY_PROVIDER=pkcs11) to the new one"
            )
        old = load_other_root_key(settings)
        assert old is not None, "the settings name another root key"
        new = load_root_key(settings)
        store = open_key_store(settings)
    except (ConfigError, StoreUnavailable) as error:
        print(f"{PROGRAM}: {error}", file=sys.stderr)
        return EXIT_REFUSED
    except RootKeyUnavailable as error:
        print(f"{PROGRAM}: {error.detail}", file=sys.stderr)
        return EXIT_REFUSED
    try:
        return _run(store, old, new, dry_run=arguments.dry_run, yes=arguments.yes)
    except Refused as refusal:
        print(f"{PROGRAM}: refused: {refusal}", file=sys.stderr)
        return EXIT_REFUSED
    except RootKeyUnavailable as error:
        print(f"{PROGRAM}: {error.message} ({error.detail}); what was re-wrapped stays valid", file=sys.stderr)
        return EXIT_STOPPED
    except (KeyIntegrityError, ConcurrentModification, StoreUnavailable) as error:
        print(f"{PROGRAM}: {error.message}", file=sys.stderr)
        return EXIT_STOPPED
    finally:
        store.close()
        old.stop()
        new.stop()


if __name__ == "__main__":
    raise SystemExit(main())
