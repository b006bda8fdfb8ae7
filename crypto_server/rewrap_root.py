"""`crypto-rewrap-root`: re-wrap every master key under a new root key (root key rotation).

The procedure (docs/operations.md), with no downtime:

1. Roll out every replica with CRYPTO_ROOT_KEY_FILE=<old> and CRYPTO_OTHER_ROOT_KEY_FILE=<new>.
2. Roll out every replica with CRYPTO_ROOT_KEY_FILE=<new> and CRYPTO_OTHER_ROOT_KEY_FILE=<old>:
   each replica unwraps under either, and wraps new master keys under the new one.
3. Run this command with the same two variables: every master key version wrapped under the old root key
   is re-wrapped under the new one (same material, so nothing else changes), then the store records the
   new root key as its own.
4. Roll out every replica with CRYPTO_ROOT_KEY_FILE=<new> only, and retire the old key.

Idempotent and resumable: versions already under the new root key are skipped.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_server.app import open_key_store
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.errors import ConcurrentModification, KeyIntegrityError, StoreUnavailable
from crypto_server.domain.key_wrap import UnwrapFailed, make_root_key_check, wrap_key
from crypto_server.root_key import load_other_root_key, load_root_key
from crypto_server.service.keyring import unwrap_version
from crypto_server.storage.port import KeyStore


@dataclass(frozen=True)
class RewrapReport:
    master_keys: int
    versions_rewrapped: int
    versions_already_rewrapped: int


def rewrap_master_keys(store: KeyStore, new_root: AESGCM, old_root: AESGCM) -> RewrapReport:
    keys = rewrapped = already = 0
    for key in store.master_keys():
        keys += 1
        for record in key.versions:
            try:
                unwrap_version(new_root, key, record)
                already += 1
                continue
            except UnwrapFailed:
                pass
            try:
                material = unwrap_version(old_root, key, record)
            except UnwrapFailed:
                raise KeyIntegrityError(
                    f"master key {key.key_id} version {record.version} opens under neither root key"
                ) from None
            wrapped = wrap_key(
                new_root,
                material,
                tenant_id=key.tenant_id,
                key_id=key.key_id,
                key_type=key.key_type.value,
                version=record.version,
                parent_version=record.parent_version,
                algorithm=key.algorithm.value,
            )
            if not store.replace_wrapped_material(
                key.tenant_id, key.key_id, record.version, record.wrapped_material, wrapped
            ):
                raise ConcurrentModification(f"master key {key.key_id} changed during the re-wrap; run it again")
            rewrapped += 1
    store.replace_root_key_check(make_root_key_check(new_root))
    return RewrapReport(keys, rewrapped, already)


def main() -> int:
    try:
        settings = Settings.from_env()
        old = load_other_root_key(settings)
        if old is None:
            raise ConfigError("set CRYPTO_OTHER_ROOT_KEY_FILE to the old root key, CRYPTO_ROOT_KEY_FILE to the new one")
        store = open_key_store(settings)
    except (ConfigError, StoreUnavailable) as error:
        print(f"crypto-rewrap-root: {error}", file=sys.stderr)
        return 2
    try:
        report = rewrap_master_keys(store, AESGCM(load_root_key(settings)), AESGCM(old))
    except (KeyIntegrityError, ConcurrentModification, StoreUnavailable) as error:
        print(f"crypto-rewrap-root: {error.message}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
