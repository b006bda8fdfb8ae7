"""Key backup and restore: ExportKey and ImportKey (docs/backup.md).

Export unwraps every version of one key in memory and seals the lot with domain/key_backup.py, for the
operator's backup public key or under this deployment's root key. Import opens a backup — a public-key
backup with this server's backup private key (CRYPTO_BACKUP_PRIVATE_KEY_FILE), a root key backup with the
root key it names — and stores the key again under this deployment's hierarchy: the tenant's master key
(created on first use, as CreateKey does) for a data or session key, the root key for a master key. Key id
and version numbers are kept, so ciphertexts made before the backup, which name both, decrypt.

Why the private key stays on the server: the material must be re-wrapped under the target's hierarchy, which
only the server can do; a private key sent over RPC would pass through every proxy, log and client on the
way, while a file configured on the target deployment is one secret in one place, like the root key.

A public-key backup proves where it goes, not where it came from: anyone with the backup public key can make
one. Restoring is therefore an `admin` call, recorded in the audit trail before it runs, and never replaces a
key: a restored key is one no ciphertext of this deployment named before.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import (
    InvalidArgument,
    KeyAlreadyExists,
    KeyNotFound,
    KeyVersionStateConflict,
    StoreUnavailable,
)
from crypto_server.domain.key_backup import (
    BackupMetadata,
    BackupPrivateKey,
    BackupVersion,
    BackupWrapping,
    KeyBackup,
    open_with_private_key,
    open_with_root_key,
    parse_backup_public_key,
    read_backup,
    seal_for_public_key,
    seal_for_root_key,
)
from crypto_server.domain.key_wrap import WrappingContext, WrappingKey, wrap_key
from crypto_server.domain.keys import (
    Key,
    KeyType,
    KeyVersion,
    parse_key_id,
    to_key_precision,
    validate_labels,
    validate_request_id,
    validate_tenant_id,
)
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.key_versions import with_every_version
from crypto_server.service.keyring import Keyring
from crypto_server.storage.port import DuplicateKeyId, DuplicateMasterKey, KeyServing, UsageCounters, VersionRef

log = logging.getLogger(__name__)


class KeyBackups:
    """ExportKey and ImportKey."""

    def __init__(
        self,
        keys: KeyServing,
        counters: UsageCounters,
        keyring: Keyring,
        lifecycle: KeyLifecycle,
        clock: Clock,
        *,
        root_fingerprint: bytes,
        other_roots: Sequence[tuple[bytes, WrappingKey]] = (),
        backup_private_key: BackupPrivateKey | None = None,
    ) -> None:
        # Key records read from the store itself through the integrity check, never from the Redis cache (a
        # cached copy may trail a destruction just scheduled: a backup would keep it); counts from the store.
        self._keys = keys
        self._counters = counters
        self._keyring = keyring
        self._lifecycle = lifecycle
        self._clock = clock
        self._root_fingerprint = root_fingerprint
        # Backups name the root key they were made under; during a root key rotation either one opens.
        self._roots = ((root_fingerprint, keyring.root), *other_roots)
        self._backup_private_key = backup_private_key

    def export_key(self, tenant_id: str, key_id: str, backup_public_key: str = "") -> tuple[Key, bytes]:
        """The key and its backup: for `backup_public_key` (PEM) when given, else under the root key."""
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)
        public_key = parse_backup_public_key(backup_public_key.encode()) if backup_public_key else None
        key = self._keys.get_key(tenant_id, key_id)
        if key is None:
            raise KeyNotFound(key_id)
        if any(version.destroyed or version.destroy_at is not None for version in key.versions):
            # A backup would keep what destruction is to erase (or has erased: the material is gone).
            raise KeyVersionStateConflict(
                key_id,
                f"key {key_id} has versions destroyed or scheduled for destruction: a backup would keep what "
                "destruction erases; cancel the destruction first, or back the key up before scheduling it",
            )
        # A backup holds every version (the key held those with a state: none, as checked above).
        key = with_every_version(self._keys, key)
        # Read from the store for its current versions; used once, never kept in the keyring.
        loaded = self._keyring.transient(key)
        backup = KeyBackup(
            # Read from the store, not the Redis cache (whose counts trail): the counts are the database's.
            metadata=_metadata_of(
                key, {v.version: v.encryptions for v in key.versions}, to_key_precision(self._clock.now())
            ),
            materials=tuple(self._keyring.material(loaded, version.version) for version in key.versions),
        )
        if public_key is not None:
            return key, seal_for_public_key(backup, public_key)
        return key, seal_for_root_key(backup, self._keyring.root, self._root_fingerprint)

    def import_key(self, tenant_id: str, blob: bytes) -> Key:
        """Restore the key a backup holds into `tenant_id` (the tenant it came from), as it was."""
        validate_tenant_id(tenant_id)
        if not blob:
            raise InvalidArgument("backup", "is required: the bytes ExportKey returned")
        sealed = read_backup(blob)
        if sealed.wrapping is BackupWrapping.ROOT_KEY:
            backup = open_with_root_key(sealed, self._roots)
        else:
            backup = open_with_private_key(sealed, self._backup_private_key)
        metadata = backup.metadata
        if metadata.tenant_id != tenant_id:
            raise InvalidArgument(
                "tenant_id",
                f"does not match the backup's tenant {metadata.tenant_id!r}: a key is restored into the tenant it "
                "was exported from (its ciphertexts are bound to that tenant)",
            )
        _check_restorable(metadata)
        if self._keys.get_key(tenant_id, metadata.key_id) is not None:
            raise _exists(metadata.key_id)
        key = self._rewrapped(backup)
        try:
            self._keys.insert_key(key)
        except DuplicateKeyId:
            raise _exists(metadata.key_id) from None
        except DuplicateMasterKey:
            raise _master_exists(tenant_id) from None
        self._restore_usage(metadata)
        log.info(
            "key restored from a backup",
            extra={"tenant_id": tenant_id, "key_id": key.key_id, "versions": len(key.versions)},
        )
        return self._keys.get_key(tenant_id, key.key_id) or key

    def _rewrapped(self, backup: KeyBackup) -> Key:
        """The backup's key, each version's material wrapped under this deployment's parent key."""
        metadata = backup.metadata
        parent: Key | None
        if metadata.key_type is KeyType.MASTER:
            existing = self._keys.get_master_key(metadata.tenant_id)
            if existing is not None:
                raise _master_exists(metadata.tenant_id, existing.key_id)
            parent, wrapping, parent_version = None, self._keyring.root, 0
        else:
            parent = self._lifecycle.master_for_wrapping(metadata.tenant_id)
            parent_version = parent.primary_version
            wrapping = self._keyring.aead(self._keyring.transient(parent), parent_version)
        versions = tuple(
            KeyVersion(
                version=version.version,
                created_at=version.created_at,
                expires_at=version.expires_at,
                parent_version=parent_version,
                wrapped_material=wrap_key(
                    wrapping,
                    material,
                    WrappingContext(
                        tenant_id=metadata.tenant_id,
                        key_id=metadata.key_id,
                        key_type=metadata.key_type.value,
                        version=version.version,
                        parent_version=parent_version,
                        algorithm=metadata.algorithm.value,
                    ),
                ),
                request_id=version.request_id,
                disabled=version.disabled,
            )
            for version, material in zip(metadata.versions, backup.materials, strict=True)
        )
        return Key(
            key_id=metadata.key_id,
            tenant_id=metadata.tenant_id,
            key_type=metadata.key_type,
            disabled=metadata.disabled,
            primary_version=metadata.primary_version,
            versions=versions,
            created_at=metadata.created_at,
            policy=metadata.policy,
            labels=metadata.labels,
            parent_key_id=None if parent is None else parent.key_id,
            algorithm=metadata.algorithm,
            min_decryption_version=metadata.min_decryption_version,
        )

    def _restore_usage(self, metadata: BackupMetadata) -> None:
        """Carry each version's encryption count over: its usage budget (AES-GCM's bound on random nonces)
        counts every encryption the material ever made, wherever it made them."""
        counts = {
            VersionRef(metadata.tenant_id, metadata.key_id, version.version): version.encryptions
            for version in metadata.versions
            if version.encryptions
        }
        if not counts:
            return
        try:
            self._counters.add_encryptions(counts)
        except StoreUnavailable:
            # The key is restored; its counts restart lower than they were. Logged for the operator.
            log.error(
                "a restored key's encryption counts could not be stored; its usage budget restarts from zero",
                extra={"tenant_id": metadata.tenant_id, "key_id": metadata.key_id},
            )


def _metadata_of(key: Key, encryptions: dict[int, int], exported_at: datetime) -> BackupMetadata:
    return BackupMetadata(
        tenant_id=key.tenant_id,
        key_id=key.key_id,
        parent_key_id=key.parent_key_id,
        key_type=key.key_type,
        algorithm=key.algorithm,
        disabled=key.disabled,
        created_at=key.created_at,
        policy=key.policy,
        labels=key.labels,
        primary_version=key.primary_version,
        versions=tuple(
            BackupVersion(
                version=version.version,
                created_at=version.created_at,
                expires_at=version.expires_at,
                encryptions=encryptions[version.version],
                request_id=version.request_id,
                disabled=version.disabled,
            )
            for version in key.versions
        ),
        exported_at=exported_at,
        min_decryption_version=key.min_decryption_version,
    )


def _check_restorable(metadata: BackupMetadata) -> None:
    """What CreateKey, RotateKey, UpdateKey and the version state changes would refuse, refused here too: an
    authentic backup may still have been made by anyone holding the backup public key, and a key stored in a
    shape the service never makes would fail its integrity check on every read after (breaking ListKeys and
    the tenant's destruction), or behave as no key the service made."""
    parse_key_id(metadata.key_id, "backup")
    try:
        validate_labels(metadata.labels)
        metadata.policy.check_bounds(metadata.key_type)
        for version in metadata.versions:
            if version.request_id is not None:
                validate_request_id(version.request_id)
    except InvalidArgument as error:
        raise InvalidArgument("backup", f"its {error}") from None
    if metadata.key_type is not KeyType.DATA and metadata.algorithm is not Algorithm.AES_256_GCM:
        raise InvalidArgument("backup", f"a {metadata.key_type.value.lower()} key must be AES_256_GCM")
    numbers = [version.version for version in metadata.versions]
    if numbers != list(range(1, len(numbers) + 1)):
        raise InvalidArgument("backup", "its versions must be numbered 1 to n without gaps, as rotation makes them")
    if metadata.primary_version != numbers[-1]:
        raise InvalidArgument(
            "backup", f"its primary version must be its latest ({numbers[-1]}), as rotation makes it; it is "
            f"{metadata.primary_version}"
        )  # fmt: skip
    request_ids = [version.request_id for version in metadata.versions if version.request_id is not None]
    if len(set(request_ids)) != len(request_ids):
        raise InvalidArgument("backup", "two of its versions have the same request id")
    if not 0 <= metadata.min_decryption_version <= metadata.primary_version:
        raise InvalidArgument("backup", "its min_decryption_version must be between 0 and its primary version")
    if metadata.versions[-1].disabled:
        raise InvalidArgument("backup", "its primary version is disabled: a primary version never is")
    if metadata.key_type is KeyType.MASTER and (
        metadata.min_decryption_version or any(version.disabled for version in metadata.versions)
    ):
        raise InvalidArgument("backup", "a master key's versions are never disabled: they unwrap the keys under it")


def _exists(key_id: str) -> KeyAlreadyExists:
    return KeyAlreadyExists(key_id, f"key {key_id} already exists; a backup is never restored over an existing key")


def _master_exists(tenant_id: str, master_key_id: str = "") -> KeyAlreadyExists:
    return KeyAlreadyExists(
        master_key_id,
        f"tenant {tenant_id!r} already has a master key{f' ({master_key_id})' if master_key_id else ''}; a master "
        "key backup restores only into a tenant without one (restore it before the tenant's other keys)",
    )
