"""The keyring: keys loaded from the store with their material unwrapped on demand.

This is the hot path's only source of keys. A loaded key stays in process
memory (bounded in count and age) so Encrypt/Decrypt with a known key do no
store round trip and no unwrapping. Changes made through this server
invalidate entries at once; `ttl_s` bounds how long a change made elsewhere
(another replica) can go unseen.

Unwrapped material lives only here, inside the typed primitives the key
managers build from it (domain/algorithms.py), and is never written anywhere.
The keyring hands out a primitive of the kind asked for (`aead`, `mac`,
`signer`, ...) or AlgorithmMismatch when the key's algorithm builds none.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from crypto_server.domain.algorithms import (
    AEAD,
    MAC,
    SIGNER,
    STREAMING_AEAD,
    VERIFIER,
    Aead,
    AlgorithmRegistry,
    Mac,
    PrimitiveKind,
    PublicKeySign,
    PublicKeyVerify,
    StreamingAead,
)
from crypto_server.domain.errors import (
    KeyIntegrityError,
    KeyNotFound,
    KeyVersionDestroyed,
    MasterKeyUnavailable,
    RootKeyUnavailable,
    StoreUnavailable,
)
from crypto_server.domain.key_destruction import check_master_usable
from crypto_server.domain.key_managers import ALGORITHMS
from crypto_server.domain.key_wrap import UnwrapFailed, WrappingContext, WrappingKey, unwrap_key
from crypto_server.domain.keys import Key, KeyVersion, parse_key_id, validate_tenant_id
from crypto_server.storage.port import KeyReader

_P = TypeVar("_P")
# Versions read on their own kept per loaded key (old ciphertexts being decrypted); past it, they are read again.
_MAX_READ_VERSIONS = 1024


class _Fill:
    """A store read under way for one slot. An invalidation of that slot (or its tenant, or everything)
    while the read runs marks it stale: what it read may predate the change, so it is not kept."""

    __slots__ = ("stale",)

    def __init__(self) -> None:
        self.stale = False


@dataclass(slots=True)
class LoadedKey:
    """A key's metadata plus the primitives built for the versions used so far."""

    key: Key
    key_uuid: uuid.UUID
    loaded_at: float
    # Per version and kind, the primitive its key manager built from the unwrapped material.
    primitives: dict[tuple[int, PrimitiveKind[Any]], Any] = field(default_factory=dict)
    # Versions the key does not hold (domain/keys.py), read when first used: kept while this entry is.
    read_versions: dict[int, KeyVersion] = field(default_factory=dict)


class Keyring:
    def __init__(
        self,
        store: KeyReader,
        root: WrappingKey,
        *,
        ttl_s: float,
        max_keys: int,
        max_stale_s: float = 0.0,
        other_roots: Sequence[WrappingKey] = (),
        algorithms: AlgorithmRegistry = ALGORITHMS,
        fresh: KeyReader | None = None,
    ):
        """`fresh`: the key records read from the database itself (past any cache), still integrity-checked;
        defaults to `store`. Read when a ciphertext names a version newer than `store` gave."""
        if ttl_s < 0 or max_keys < 1 or max_stale_s < 0:
            raise ValueError("keyring ttl and max_stale must be >= 0 and max_keys >= 1")
        self._max_stale_s = max_stale_s
        # Lookups answered from memory and lookups that went to the store (for metrics).
        self.hits = 0
        self.misses = 0
        self._store = store
        self._fresh = fresh or store
        self.root = root
        # The key managers: what each key's algorithm builds, and how new material is made for it.
        self.algorithms = algorithms
        # Root keys that master keys may still be wrapped under (during a root key rotation); never wrap with them.
        self._unwrapping_roots = (root, *other_roots)
        self._ttl_s = ttl_s
        self._max_keys = max_keys
        self._loaded: OrderedDict[tuple[str, str], LoadedKey] = OrderedDict()
        # Store reads under way, per slot; only ever as many as there are concurrent misses.
        self._fills: dict[tuple[str, str], list[_Fill]] = {}
        self._lock = threading.Lock()

    def fresh(self, tenant_id: str, key_id: str) -> LoadedKey | None:
        """The key if it is in memory and fresh; never touches the store (the hot path's first look)."""
        slot = (tenant_id, key_id)
        with self._lock:
            loaded = self._loaded.get(slot)
            if loaded is not None and time.monotonic() - loaded.loaded_at < self._ttl_s:
                self._loaded.move_to_end(slot)
                self.hits += 1
                return loaded
        return None

    def lookup(self, tenant_id: str, key_id: str) -> LoadedKey:
        """`get` for ids straight from a request: validated only on a miss (only valid ids are ever held)."""
        loaded = self.fresh(tenant_id, key_id)
        if loaded is None:
            validate_tenant_id(tenant_id)
            parse_key_id(key_id)
            loaded = self.get(tenant_id, key_id)
        return loaded

    def get(self, tenant_id: str, key_id: str, *, past_cache: bool = False) -> LoadedKey:
        """The key, from memory when fresh, else from the store (`past_cache`: from the database itself).
        Raises KeyNotFound.

        When the store is unavailable, a key whose entry has merely aged past
        the TTL keeps being served for up to `max_stale_s` more: nothing said
        it changed (an invalidation would have removed it), and encryption
        with known keys should survive a database outage.
        """
        slot = (tenant_id, key_id)
        now = time.monotonic()
        fill = _Fill()
        with self._lock:
            loaded = self._loaded.get(slot)
            if loaded is not None and now - loaded.loaded_at < self._ttl_s:
                self._loaded.move_to_end(slot)
                self.hits += 1
                return loaded
            self.misses += 1
            self._fills.setdefault(slot, []).append(fill)
        try:
            try:
                key = (self._fresh if past_cache else self._store).get_key(tenant_id, key_id)
            except StoreUnavailable:
                with self._lock:
                    still_held = self._loaded.get(slot) is loaded
                if loaded is not None and still_held and now - loaded.loaded_at < self._ttl_s + self._max_stale_s:
                    return loaded
                raise
            if key is None:
                raise KeyNotFound(key_id)
            return self._keep(key, fill)
        finally:
            with self._lock:
                fills = self._fills[slot]
                fills.remove(fill)
                if not fills:
                    del self._fills[slot]

    def _keep(self, key: Key, fill: _Fill | None) -> LoadedKey:
        """Hold `key` in memory, unless an invalidation arrived while `fill` was reading it: then the
        caller gets it (its call overlapped the change) but nobody after it does."""
        loaded = LoadedKey(key=key, key_uuid=uuid.UUID(key.key_id), loaded_at=time.monotonic())
        slot = (key.tenant_id, key.key_id)
        with self._lock:
            if fill is not None and fill.stale:
                return loaded
            previous = self._loaded.get(slot)
            if previous is not None and _material_of(previous.key) == _material_of(key):
                # Same material (counts and states may differ; they are checked per call, not kept in the
                # primitives): keep what was already unwrapped.
                loaded.primitives = previous.primitives
            self._loaded[slot] = loaded
            self._loaded.move_to_end(slot)
            while len(self._loaded) > self._max_keys:
                self._loaded.popitem(last=False)
        return loaded

    def with_version(self, loaded: LoadedKey, version: int) -> LoadedKey:
        """`loaded`, or the key read again from the store when it names a version newer than the one held:
        another server may have just rotated it and made the ciphertext or MAC in hand (the change reaches
        this server within the invalidation bound, but the caller is here now). Only a version above the
        latest held costs a store read; when the cache still gives an older key (a cache that lost writes:
        Redis restored from an older snapshot), the database is read, so the ciphertext is not refused as
        undecryptable (DECRYPTION_FAILED is final to a caller) while the key that made it is stored."""
        if version <= loaded.key.latest_version:
            return loaded
        key = loaded.key
        self.forget_unless_current(key.tenant_id, key.key_id, key.revision + 1)
        again = self.get(key.tenant_id, key.key_id)
        if version <= again.key.latest_version:
            return again
        self.forget_unless_current(key.tenant_id, key.key_id, again.key.revision + 1)
        return self.get(key.tenant_id, key.key_id, past_cache=True)

    def version(self, loaded: LoadedKey, number: int) -> KeyVersion | None:
        """Version `number` of `loaded`: held by the key, or read from the store on first use (checked by its own
        tag) and kept with the entry. None for a number the key has never had. A version the key does not hold
        has no state of its own as of the key's read; one read later may have gained one (it is newer than the
        key), and is used as read: a state only ever refuses more."""
        key = loaded.key
        record = key.version(number)
        if record is not None or not 1 <= number <= key.primary_version:
            return record
        record = loaded.read_versions.get(number)
        if record is None:
            found = self._store.list_versions(key.tenant_id, key.key_id, number - 1, 1)
            if not found or found[0].version != number:
                raise KeyIntegrityError(f"key {key.key_id} has lost version {number} from the store")
            record = found[0]
            if len(loaded.read_versions) >= _MAX_READ_VERSIONS:
                del loaded.read_versions[next(iter(loaded.read_versions))]  # the one read first
            loaded.read_versions[number] = record
        return record

    def remember(self, key: Key) -> LoadedKey:
        """Hold `key`, just written by this server, in memory."""
        return self._keep(key, None)

    @staticmethod
    def transient(key: Key) -> LoadedKey:
        """`key` as a LoadedKey that is not kept: for a key read outside the keyring (whose read may
        predate an invalidation), used once."""
        return LoadedKey(key=key, key_uuid=uuid.UUID(key.key_id), loaded_at=time.monotonic())

    def forget(self, tenant_id: str, key_id: str) -> None:
        slot = (tenant_id, key_id)
        with self._lock:
            self._loaded.pop(slot, None)
            for fill in self._fills.get(slot, ()):
                fill.stale = True

    def forget_unless_current(self, tenant_id: str, key_id: str, revision: int) -> None:
        """Forget the key unless what is held is at `revision` or later (a change heard of twice)."""
        with self._lock:
            loaded = self._loaded.get((tenant_id, key_id))
            if loaded is not None and loaded.key.revision >= revision:
                return
        self.forget(tenant_id, key_id)

    def forget_tenant_unless_current(self, tenant_id: str, master_key_id: str, revision: int) -> None:
        """Forget the tenant's keys after its master key changed, unless the master held is that revision."""
        with self._lock:
            loaded = self._loaded.get((tenant_id, master_key_id))
            if loaded is not None and loaded.key.revision >= revision:
                return
        self.forget_tenant(tenant_id)

    def forget_tenant(self, tenant_id: str) -> None:
        with self._lock:
            for slot in [slot for slot in self._loaded if slot[0] == tenant_id]:
                del self._loaded[slot]
            for slot, fills in self._fills.items():
                if slot[0] == tenant_id:
                    for fill in fills:
                        fill.stale = True

    def forget_all(self) -> None:
        with self._lock:
            self._loaded.clear()
            for fills in self._fills.values():
                for fill in fills:
                    fill.stale = True

    def aead(self, loaded: LoadedKey, version: int) -> Aead:
        """The AEAD for one version of `loaded`, unwrapping it (through its parent) on first use.

        Raises AlgorithmMismatch when the key's algorithm builds no AEAD, MasterKeyUnavailable when the parent
        master key is disabled. The same holds for the other kinds below.
        """
        return self.primitive(loaded, version, AEAD)

    def streaming_aead(self, loaded: LoadedKey, version: int) -> StreamingAead:
        return self.primitive(loaded, version, STREAMING_AEAD)

    def mac(self, loaded: LoadedKey, version: int) -> Mac:
        return self.primitive(loaded, version, MAC)

    def signer(self, loaded: LoadedKey, version: int) -> PublicKeySign:
        return self.primitive(loaded, version, SIGNER)

    def verifier(self, loaded: LoadedKey, version: int) -> PublicKeyVerify:
        return self.primitive(loaded, version, VERIFIER)

    def primitive(self, loaded: LoadedKey, version: int, kind: PrimitiveKind[_P]) -> _P:
        """The `kind` primitive of one version, built by the key's manager on first use and kept with the
        loaded key. Only a primitive of the right kind is ever kept, so a cached one needs no check."""
        slot = (version, kind)
        built = loaded.primitives.get(slot)
        if built is None:
            key = loaded.key
            manager = self.algorithms.require(key.key_id, key.algorithm, kind, kind.use)
            built = manager.primitive(kind, self.material(loaded, version))
            # Racing threads may both unwrap; the results are identical, so last write wins harmlessly.
            loaded.primitives[slot] = built
        result: _P = built
        return result

    def material(self, loaded: LoadedKey, version: int) -> bytes:
        """The raw bytes of one version, unwrapped through its parent. Only for RPCs whose purpose is
        to hand a key to its caller (session keys); everything else uses a typed primitive (`aead`, `mac`, ...)."""
        key = loaded.key
        record = self.version(loaded, version)
        if record is None:
            raise KeyError(version)
        if key.parent_key_id is None:
            if record.destroyed:
                raise KeyVersionDestroyed(key.key_id, version)
            parents: tuple[WrappingKey, ...] = self._unwrapping_roots
        else:
            parent_key = self._parent(key)
            if record.destroyed:
                raise KeyVersionDestroyed(key.key_id, version)
            parents = (self.aead(parent_key, record.parent_version),)
        unavailable: RootKeyUnavailable | None = None
        for parent in parents:
            try:
                return unwrap_version(parent, key, record)
            except UnwrapFailed:
                continue
            except RootKeyUnavailable as error:
                # Another root key (during a migration to or from an HSM) may still open it.
                unavailable = error
        if unavailable is not None:
            # Not proof of damage: the key that would open it could not be asked.
            raise unavailable
        raise KeyIntegrityError(f"key {key.key_id} version {version} does not unwrap")

    def _parent(self, key: Key) -> LoadedKey:
        """The master key that wraps `key`, checked usable: not disabled, its tenant neither destroyed nor
        scheduled for destruction (every unwrapping of a tenant's key passes here, whatever asked for it)."""
        assert key.parent_key_id is not None
        try:
            parent_key = self.get(key.tenant_id, key.parent_key_id)
        except KeyNotFound:
            raise KeyIntegrityError(f"key {key.key_id} names a parent key that does not exist") from None
        check_master_usable(parent_key.key)
        if parent_key.key.disabled:
            raise MasterKeyUnavailable("the tenant's master key is disabled, so none of its keys can be used")
        return parent_key

    def check_tenant(self, key: Key) -> None:
        """Raise TenantDestroyed / TenantDestructionScheduled when `key`'s tenant is (a clearer answer than
        the key's own destroyed or scheduled versions; only asked on the way to refusing)."""
        if key.parent_key_id is not None:
            try:
                master = self.get(key.tenant_id, key.parent_key_id)
            except KeyNotFound:
                return
            check_master_usable(master.key)


def unwrap_version(parent: WrappingKey, key: Key, record: KeyVersion) -> bytes:
    """One version's material, unwrapped under `parent` with the binding of that key and version."""
    return unwrap_key(parent, record.wrapped_material, WrappingContext.of(key, record))


def _material_of(key: Key) -> list[tuple[int, int, bytes]]:
    """What a key's unwrapped primitives depend on: each version's number, wrapping parent and wrapped bytes (an
    erased version has none, so destroying one drops them)."""
    return [(version.version, version.parent_version, version.wrapped_material) for version in key.versions]
