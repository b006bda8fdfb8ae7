"""Key lifecycle: create, get, list, rotate, update, disable, enable.

The hierarchy: the root key wraps each tenant's master key; the master key
wraps the tenant's data and session keys. A tenant's master key is created on
its first data or session key.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from types import MappingProxyType

from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import (
    ConcurrentModification,
    InvalidArgument,
    KeyDisabled,
    KeyExpired,
    KeyIntegrityError,
    KeyNotFound,
    KeyTypeMismatch,
    MasterKeyExists,
    MasterKeyUnavailable,
)
from crypto_server.domain.key_destruction import (
    check_can_encrypt,
    check_can_rotate,
    check_master_usable,
    with_min_decryption_version,
)
from crypto_server.domain.key_wrap import WrappingContext, wrap_key
from crypto_server.domain.keys import (
    MAX_SESSION_KEY_LIFETIME,
    Key,
    KeyPolicy,
    KeyState,
    KeyType,
    KeyVersion,
    key_id_for_request,
    parse_key_id,
    to_key_precision,
    validate_labels,
    validate_request_id,
    validate_tenant_id,
)
from crypto_server.service.key_versions import vouched_versions
from crypto_server.service.keyring import Keyring
from crypto_server.service.page_token import (
    decode_page_token,
    decode_version_page_token,
    encode_page_token,
    encode_version_page_token,
)
from crypto_server.storage.port import (
    DuplicateKeyId,
    DuplicateMasterKey,
    Invalidation,
    KeyQuery,
    KeyReader,
    KeyServing,
    ListCursor,
    RotationSchedule,
)

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Each failed attempt means another writer added a version, so the key moves
# forward; the bound only stops a pathological storm from spinning forever.
MAX_ROTATION_ATTEMPTS = 100
# A GenerateSessionKey repeated with its request id returns the same material only this long after
# the first: long enough for a client's retries, too short for a request id to serve as a capability.
SESSION_KEY_REPLAY_WINDOW = timedelta(minutes=10)
# The request ids of automatic rotations (KeyRotator): "auto-rotation.<the version it creates>".
AUTOMATIC_ROTATION_PREFIX = "auto-rotation."
UPDATABLE_FIELDS = ("expire_after", "rotation_period", "labels", "min_decryption_version")


@dataclass(frozen=True, slots=True)
class KeyPage:
    keys: list[Key]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class VersionPage:
    """One page of a key's versions, ascending. `key` is the key as get_key read it: its
    min_decryption_version decides each version's effective state (Key.version_state_at)."""

    key: Key
    versions: list[KeyVersion]
    next_page_token: str


class KeyLifecycle:
    def __init__(
        self,
        store: KeyServing,
        keyring: Keyring,
        clock: Clock,
        invalidation: Invalidation,
        *,
        schedule: RotationSchedule,
        request_key_id_secret: bytes,
        max_session_lifetime: timedelta = MAX_SESSION_KEY_LIFETIME,
        session_key_replay_window: timedelta = SESSION_KEY_REPLAY_WINDOW,
        fresh: KeyReader | None = None,
    ) -> None:
        """`fresh`: the key records read from the database itself, still integrity-checked (defaults to `store`):
        what a change is made from. A cached copy carries its revision outside the integrity tag, so an older
        copy given the current revision would pass the store's compare-and-set and be written back."""
        self._request_key_id_secret = request_key_id_secret
        self._session_key_replay_window = session_key_replay_window
        self._store = store
        self._fresh = fresh or store
        # Outside the key records (and so outside the cache and the integrity check): the store itself.
        self._schedule = schedule
        self._keyring = keyring
        self._clock = clock
        self._invalidation = invalidation
        self._max_session_lifetime = max_session_lifetime

    # -- create ----------------------------------------------------------------

    def create_key(
        self,
        tenant_id: str,
        key_type: KeyType,
        *,
        expire_after: timedelta | None = None,
        rotation_period: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str = "",
        algorithm: Algorithm = Algorithm.AES_256_GCM,
    ) -> Key:
        """Create a key; with a `request_id`, a repeat of the same request returns the first key instead."""
        key, _ = self._create_or_repeat(
            tenant_id,
            key_type,
            expire_after=expire_after,
            rotation_period=rotation_period,
            labels=labels,
            request_id=request_id,
            algorithm=algorithm,
        )
        return key

    def _create_or_repeat(
        self,
        tenant_id: str,
        key_type: KeyType,
        *,
        expire_after: timedelta | None,
        rotation_period: timedelta | None,
        labels: Mapping[str, str] | None,
        request_id: str,
        algorithm: Algorithm,
    ) -> tuple[Key, bool]:
        """The new key and True, or the key an earlier request with `request_id` made and False."""
        validate_tenant_id(tenant_id)
        validate_request_id(request_id)
        self._check_algorithm_of_new_key(key_type, algorithm)
        policy = KeyPolicy.for_new_key(
            key_type, expire_after, rotation_period, max_session_lifetime=self._max_session_lifetime
        )
        checked_labels = validate_labels(labels or {})
        key_id = (
            key_id_for_request(tenant_id, request_id, self._request_key_id_secret) if request_id else str(uuid.uuid4())
        )
        if request_id:
            repeat = self._earlier_creation(tenant_id, key_id, key_type, policy, checked_labels, algorithm)
            if repeat is not None:
                return repeat, False
        if key_type is KeyType.MASTER:
            existing = self._store.get_master_key(tenant_id)
            if existing is not None:
                raise MasterKeyExists(existing.key_id)
            parent = None
        else:
            parent = self._master_for_wrapping(tenant_id)
        key = self._new_key(tenant_id, key_id, key_type, policy, checked_labels, parent, algorithm)
        try:
            self._store.insert_key(key)
        except DuplicateKeyId:
            # The same request raced with itself (a retry while the first attempt was still running).
            repeat = (
                self._earlier_creation(tenant_id, key_id, key_type, policy, checked_labels, algorithm)
                if request_id
                else None
            )
            if repeat is None:
                raise ConcurrentModification("the new key's id collided with another key; retry") from None
            return repeat, False
        except DuplicateMasterKey:
            master = self._store.get_master_key(tenant_id)
            raise MasterKeyExists(master.key_id if master else "unknown") from None
        return key, True

    def _check_algorithm_of_new_key(self, key_type: KeyType, algorithm: Algorithm) -> None:
        """`algorithm` must have a key manager here, open to `key_type` keys."""
        algorithms = self._keyring.algorithms
        manager = algorithms.find(algorithm)
        if manager is None:
            names = ", ".join(a.value for a in algorithms.algorithms())
            raise InvalidArgument("algorithm", f"{algorithm.value} is not supported by this server; use one of {names}")
        if key_type not in manager.key_types:
            able = ", ".join(a.value for a in algorithms.open_to(key_type))
            raise InvalidArgument(
                "algorithm", f"{key_type.value.lower()} keys cannot use {algorithm.value}; they may use {able}"
            )

    def _earlier_creation(
        self,
        tenant_id: str,
        key_id: str,
        key_type: KeyType,
        policy: KeyPolicy,
        labels: Mapping[str, str],
        algorithm: Algorithm,
    ) -> Key | None:
        """The key an earlier CreateKey with the same request id made, if any."""
        existing = self._store.get_key(tenant_id, key_id)
        if existing is None:
            return None
        if not existing.same_creation_as(key_type, policy, labels, algorithm):
            raise InvalidArgument("request_id", "was already used by a CreateKey with other parameters")
        return existing

    def _new_key(
        self,
        tenant_id: str,
        key_id: str,
        key_type: KeyType,
        policy: KeyPolicy,
        labels: Mapping[str, str],
        parent: Key | None,
        algorithm: Algorithm = Algorithm.AES_256_GCM,
    ) -> Key:
        """A key with its first version, wrapped under `parent` (the root key for a master key)."""
        now = to_key_precision(self._clock.now())
        first = self._new_version(
            tenant_id, key_id, key_type, 1, now, policy.expiry_for(now), parent, algorithm=algorithm
        )
        return Key(
            key_id=key_id,
            tenant_id=tenant_id,
            key_type=key_type,
            disabled=False,
            primary_version=1,
            versions=(first,),
            created_at=now,
            policy=policy,
            labels=labels,
            parent_key_id=None if parent is None else parent.key_id,
            algorithm=algorithm,
        )

    def master_for_wrapping(self, tenant_id: str) -> Key:
        """The tenant's master key, created on first use (as CreateKey does), checked able to wrap."""
        return self._master_for_wrapping(tenant_id)

    def _master_for_wrapping(self, tenant_id: str) -> Key:
        """The tenant's master key, created on first use, checked able to wrap."""
        master = self._store.get_master_key(tenant_id)
        if master is None:
            policy = KeyPolicy.for_new_key(KeyType.MASTER, None, None, implicit_master=True)
            master = self._new_key(tenant_id, str(uuid.uuid4()), KeyType.MASTER, policy, MappingProxyType({}), None)
            try:
                self._store.insert_key(master)
            except DuplicateMasterKey:
                # Another request created it first; use theirs.
                master = self._store.get_master_key(tenant_id)
                assert master is not None, "a master key that conflicted on insert exists"
        # A destroyed tenant's master key stays, so that none is created implicitly: the tenant takes no keys.
        check_master_usable(master)
        state = master.state_at(self._clock.now())
        if state is KeyState.DISABLED:
            raise MasterKeyUnavailable("the tenant's master key is disabled; enable it to create or rotate keys")
        if state is KeyState.EXPIRED:
            raise MasterKeyUnavailable("the tenant's master key has expired; rotate it to create or rotate keys")
        return master

    def _new_version(
        self,
        tenant_id: str,
        key_id: str,
        key_type: KeyType,
        version: int,
        created_at: datetime,
        expires_at: datetime | None,
        parent: Key | None,
        *,
        algorithm: Algorithm,
        request_id: str | None = None,
    ) -> KeyVersion:
        """Fresh material for `version`, wrapped under the parent's primary version (the root key if None)."""
        if parent is None:
            parent_version = 0
            wrapping = self._keyring.root
        else:
            parent_version = parent.primary_version
            # Read from the store for its state, not through the keyring: used once, never kept there.
            wrapping = self._keyring.aead(self._keyring.transient(parent), parent_version)
        # A key of an algorithm this server has no manager for (made by a newer server) cannot be rotated here.
        manager = self._keyring.algorithms.require(key_id, algorithm, None, "RotateKey")
        context = WrappingContext(tenant_id, key_id, key_type.value, version, parent_version, algorithm.value)
        wrapped = wrap_key(wrapping, manager.new_material(), context)
        return KeyVersion(
            version=version,
            created_at=created_at,
            expires_at=expires_at,
            parent_version=parent_version,
            wrapped_material=wrapped,
            request_id=request_id,
        )

    # -- session keys ------------------------------------------------------------

    def generate_session_key(
        self,
        tenant_id: str,
        *,
        expire_after: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> tuple[Key, bytes]:
        """A new session key and its material, handed to the caller.

        A repeat with the same request_id (a retry whose answer was lost) returns the same key, under the
        same checks as GetSessionKey (enabled, unexpired) and only within the replay window.
        """
        key, created = self._create_or_repeat(
            tenant_id,
            KeyType.SESSION,
            expire_after=expire_after,
            rotation_period=None,
            labels=labels,
            request_id=request_id,
            algorithm=Algorithm.AES_256_GCM,
        )
        if not created:
            now = self._clock.now()
            if now - key.created_at > self._session_key_replay_window:
                raise InvalidArgument(
                    "request_id",
                    f"was used by a GenerateSessionKey more than {self._session_key_replay_window} ago; "
                    "use a new request id, or GetSessionKey with the key id",
                )
            self._check_session_key_usable(key, now)
        return key, self._keyring.material(self._keyring.remember(key), key.primary_version)

    @staticmethod
    def _check_session_key_usable(key: Key, now: datetime) -> None:
        check_can_encrypt(key)
        state = key.state_at(now)
        if state is KeyState.DISABLED:
            raise KeyDisabled(key.key_id)
        if state is KeyState.EXPIRED:
            raise KeyExpired(key.key_id, key.primary_version)

    def get_session_key(self, tenant_id: str, key_id: str) -> tuple[Key, bytes]:
        """A session key's current material, while it is enabled and unexpired."""
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)
        loaded = self._keyring.get(tenant_id, key_id)
        key = loaded.key
        if key.key_type is not KeyType.SESSION:
            raise KeyTypeMismatch(
                key_id,
                f"key {key_id} is a {key.key_type.value.lower()} key, not a session key; "
                "only session keys hand out their material",
            )
        if key.primary.destroyed or key.primary.destroy_at is not None:
            self._keyring.check_tenant(key)  # a tenant destroyed (or about to be) says so
        self._check_session_key_usable(key, self._clock.now())
        return key, self._keyring.material(loaded, key.primary_version)

    # -- read ------------------------------------------------------------------

    def get_key(self, tenant_id: str, key_id: str) -> Key:
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)
        key = self._store.get_key(tenant_id, key_id)
        if key is None:
            raise KeyNotFound(key_id)
        return key

    def list_keys(
        self,
        tenant_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        key_type: KeyType | None = None,
        state: KeyState | None = None,
    ) -> KeyPage:
        validate_tenant_id(tenant_id)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page_size", f"must be between 0 (the default, {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}"
            )
        limit = page_size or DEFAULT_PAGE_SIZE
        query = KeyQuery(tenant_id=tenant_id, limit=limit + 1, now=self._clock.now(), key_type=key_type, state=state)
        if page_token:
            query = KeyQuery(
                tenant_id=tenant_id,
                limit=limit + 1,
                now=query.now,
                key_type=key_type,
                state=state,
                after=decode_page_token(page_token, query),
            )
        keys = self._store.list_keys(query)
        if len(keys) <= limit:
            return KeyPage(keys=keys, next_page_token="")
        keys = keys[:limit]
        last = keys[-1]
        return KeyPage(keys=keys, next_page_token=encode_page_token(query, ListCursor(last.created_at, last.key_id)))

    def list_key_versions(
        self, tenant_id: str, key_id: str, *, page_size: int = 0, page_token: str = ""
    ) -> VersionPage:
        """One page of the key's versions (1 to its primary), ascending: what a key with many versions shows
        beyond what get_key holds. Costs one key read and one range read, however many versions the key has."""
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page_size", f"must be between 0 (the default, {DEFAULT_PAGE_SIZE}) and {MAX_PAGE_SIZE}"
            )
        limit = page_size or DEFAULT_PAGE_SIZE
        after = decode_version_page_token(page_token, tenant_id, key_id) if page_token else 0
        # One more than the page: whether another page follows, without a second read. Each version as the key
        # vouches for it (service/key_versions.py): the states shown are the authenticated ones.
        key, versions = vouched_versions(
            self._store,
            self.get_key(tenant_id, key_id),
            lambda k: self._store.list_versions(tenant_id, key_id, after, limit + 1),
        )
        if len(versions) <= limit:
            return VersionPage(key=key, versions=versions, next_page_token="")
        versions = versions[:limit]
        return VersionPage(
            key=key,
            versions=versions,
            next_page_token=encode_version_page_token(tenant_id, key_id, versions[-1].version),
        )

    # -- change ----------------------------------------------------------------

    def rotate_key(self, tenant_id: str, key_id: str, *, request_id: str = "") -> Key:
        """Add a version and make it primary; with a `request_id`, a repeat adds nothing.

        Optimistic: the new version is numbered latest + 1 and wrapped for that
        number; if another writer added a version first, reload and try again.
        """
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)
        validate_request_id(request_id)
        for _ in range(MAX_ROTATION_ATTEMPTS):
            key = self._fresh.get_key(tenant_id, key_id)
            if key is None:
                raise KeyNotFound(key_id)
            if request_id and self._store.version_for_request(tenant_id, key_id, request_id) is not None:
                return key  # a repeat: that rotation made its version already
            if key.disabled:
                raise KeyDisabled(key_id)
            check_can_rotate(key)
            pending = self._store.pending_version(tenant_id, key_id, key.latest_version + 1)
            if pending is not None:
                # A rotation stopped between its two writes (or is between them now): finish it first,
                # so versions stay consecutive and a retry of that request finds its version.
                self._finish_pending_rotation(key, pending)
                continue
            parent = None if key.parent_key_id is None else self._master_for_wrapping(tenant_id)
            now = to_key_precision(self._clock.now())
            version = self._new_version(
                tenant_id,
                key_id,
                key.key_type,
                key.latest_version + 1,
                now,
                key.policy.expiry_for(now),
                parent,
                algorithm=key.algorithm,
                request_id=request_id or None,
            )
            if self._store.add_version(key.with_new_primary(version), key.revision):
                self._invalidation.key_changed(tenant_id, key_id)
                return key.with_new_primary(version)
            # Lost the race, unless whoever won finished this very version (see above).
            now_stored = self._fresh.get_key(tenant_id, key_id)
            mine = None if now_stored is None else now_stored.version(version.version)
            if now_stored is not None and mine is not None and mine.wrapped_material == version.wrapped_material:
                self._invalidation.key_changed(tenant_id, key_id)
                return now_stored
        raise ConcurrentModification(f"key {key_id} is being rotated concurrently by many callers; retry the rotation")

    def _finish_pending_rotation(self, key: Key, pending: KeyVersion) -> None:
        """Make `pending` the primary, once it is shown to unwrap (a stored version nobody can open
        must never become the version everything encrypts with)."""
        finished = key.with_new_primary(pending)
        try:
            self._keyring.material(self._keyring.transient(finished), pending.version)
        except KeyError:
            raise KeyIntegrityError(f"key {key.key_id} has a pending version that does not belong to it") from None
        if self._store.add_version(finished, key.revision):
            self._invalidation.key_changed(key.tenant_id, key.key_id)

    def automatic_rotation_request(
        self, tenant_id: str, key_id: str, usage_soft_limit: int | None = None
    ) -> str | None:
        """The request id an automatic rotation of this key uses now, or None when it is not due.

        Named after the version it creates ("auto-rotation.N"): two rotators that both find the key due (a lease
        handed over while the old holder was mid-tick) make one version between them, as a RotateKey retried
        with its request id does. A key not due is rescheduled, so an outdated stored schedule is read once.
        A key whose primary has made `usage_soft_limit` encryptions is due whatever its schedule.
        """
        key = self._store.get_key(tenant_id, key_id)
        if key is None:
            return None
        over_budget = usage_soft_limit is not None and key.primary.encryptions >= usage_soft_limit
        if not over_budget and not key.rotation_due(self._clock.now()):
            self._schedule.reschedule_rotation(tenant_id, key_id, key.revision, key.next_rotation_at)
            return None
        return f"{AUTOMATIC_ROTATION_PREFIX}{key.latest_version + 1}"

    def update_key(
        self,
        tenant_id: str,
        key_id: str,
        *,
        update_mask: Sequence[str],
        expire_after: timedelta | None = None,
        rotation_period: timedelta | None = None,
        labels: Mapping[str, str] | None = None,
        min_decryption_version: int = 0,
    ) -> Key:
        """Change the fields named in `update_mask` ("expire_after", "rotation_period", "labels",
        "min_decryption_version"); a named field given as None clears it (versions never expire / no automatic
        rotation / no labels; 0: every version decrypts).

        `expire_after` applies to versions created from now on: the current primary keeps its expiry (rotate to
        give the key a primary with the new one). A new rotation period reschedules the next rotation at once.
        """
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)
        fields = set(update_mask)
        if not fields:
            raise InvalidArgument("update_mask", "name at least one field to change: " + ", ".join(UPDATABLE_FIELDS))
        unknown = fields - set(UPDATABLE_FIELDS)
        if unknown:
            raise InvalidArgument(
                "update_mask",
                f"cannot change {', '.join(sorted(unknown))}; the fields that can be changed are "
                + ", ".join(UPDATABLE_FIELDS),
            )
        checked_labels = validate_labels(labels or {}) if "labels" in fields else None
        for _ in range(MAX_ROTATION_ATTEMPTS):
            key = self._fresh.get_key(tenant_id, key_id)
            if key is None:
                raise KeyNotFound(key_id)
            policy = key.policy.updated(
                key.key_type,
                expire_after=expire_after if "expire_after" in fields else key.policy.expire_after,
                rotation_period=rotation_period if "rotation_period" in fields else key.policy.rotation_period,
                max_session_lifetime=self._max_session_lifetime,
            )
            changed = key.with_settings(policy, key.labels if checked_labels is None else checked_labels)
            if "min_decryption_version" in fields:
                changed = with_min_decryption_version(changed, min_decryption_version)
            if self._store.update_key(changed, key.revision):
                break
        else:
            raise ConcurrentModification(f"key {key_id} is being changed concurrently by many callers; retry")
        self._invalidation.key_changed(tenant_id, key_id)
        return changed

    def disable_key(self, tenant_id: str, key_id: str) -> Key:
        return self._set_disabled(tenant_id, key_id, True)

    def enable_key(self, tenant_id: str, key_id: str) -> Key:
        return self._set_disabled(tenant_id, key_id, False)

    def _set_disabled(self, tenant_id: str, key_id: str, disabled: bool) -> Key:
        validate_tenant_id(tenant_id)
        parse_key_id(key_id)
        for _ in range(MAX_ROTATION_ATTEMPTS):
            key = self._fresh.get_key(tenant_id, key_id)
            if key is None:
                raise KeyNotFound(key_id)
            changed = key.with_disabled(disabled)
            # From the state read only: the stored metadata and its tag always describe one state.
            if key.disabled == disabled or self._store.update_key(changed, key.revision):
                break
        else:
            raise ConcurrentModification(f"key {key_id} is being changed concurrently by many callers; retry")
        if key.key_type is KeyType.MASTER:
            # Every key of the tenant is unwrapped through the master key.
            self._invalidation.tenant_changed(tenant_id)
        else:
            self._invalidation.key_changed(tenant_id, key_id)
        return changed
