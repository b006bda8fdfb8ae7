"""The one place that decides whether a call may proceed: the RPC → permission table and the checks.

The middleware calls `AccessControl.authorize` once per RPC (for a stream: on its first message), after
`identify`. With no access policy configured (development) nothing is restricted and the caller is only
identified. Denials raise PermissionDenied / Unauthenticated, which the error table maps and the audit
trail records.

Label-narrowed rules (docs/security.md, "Identity and access") need the labels of every key a call names:
the key id fields, the key a ciphertext names in its header, every item of a batch (one item outside the
caller's labels refuses the whole batch), and the labels a new key is created with (or an UpdateKey gives
a key, besides those it has). ListKeys answers only
the keys the caller may see.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import yaml

from crypto_client.v1 import key_service_pb2, resources_pb2
from crypto_server.call_context import Principal
from crypto_server.domain import ciphertext as codec
from crypto_server.domain import stream_format
from crypto_server.domain.access_policy import AccessPolicy, KeyAccess, Permission
from crypto_server.domain.errors import CryptoServiceError, DecryptionFailed, PermissionDenied, Unauthenticated
from crypto_server.domain.key_backup import read_backup
from crypto_server.domain.keys import KeyType
from crypto_server.transport.identity import TokenVerifier, principal_of
from crypto_server.watched_file import WatchedFile

P = Permission
# Every caas.crypto.v1 RPC (by its proto method name) and the permissions it needs; a test checks that
# every method of both services is here. ReEncrypt opens with one key and seals with another.
REQUIRED_PERMISSIONS: Mapping[str, tuple[Permission, ...]] = {
    # KeyService
    "CreateKey": (P.MANAGE_KEYS,),
    "GetKey": (P.READ_KEYS,),
    "ListKeys": (P.READ_KEYS,),
    "RotateKey": (P.MANAGE_KEYS,),
    "UpdateKey": (P.MANAGE_KEYS,),
    "DisableKey": (P.MANAGE_KEYS,),
    "EnableKey": (P.MANAGE_KEYS,),
    "GenerateSessionKey": (P.SESSION_KEYS,),
    "GetSessionKey": (P.SESSION_KEYS,),
    "ReadAuditLog": (P.AUDIT_READ,),
    "ExportKey": (P.ADMIN,),
    "ImportKey": (P.ADMIN,),
    # CryptoService
    "Encrypt": (P.ENCRYPT,),
    "Decrypt": (P.DECRYPT,),
    "GenerateDataKey": (P.GENERATE_DATA_KEY,),
    "ReEncrypt": (P.DECRYPT, P.ENCRYPT),
    "BatchEncrypt": (P.ENCRYPT,),
    "BatchDecrypt": (P.DECRYPT,),
    "ComputeMac": (P.MAC,),
    "VerifyMac": (P.MAC,),
    "Sign": (P.SIGN,),
    "Verify": (P.SIGN,),
    "GetPublicKey": (P.READ_KEYS,),
    "EncryptStream": (P.ENCRYPT,),
    "DecryptStream": (P.DECRYPT,),
    # Versions and destruction (KeyService)
    "DisableKeyVersion": (P.MANAGE_KEYS,),
    "EnableKeyVersion": (P.MANAGE_KEYS,),
    "ScheduleKeyVersionDestruction": (P.MANAGE_KEYS,),
    "ScheduleKeyDestruction": (P.MANAGE_KEYS,),
    "CancelKeyDestruction": (P.MANAGE_KEYS,),
    "ScheduleTenantDestruction": (P.ADMIN,),
    "CancelTenantDestruction": (P.ADMIN,),
    # Names one key, like GetKey: a label-narrowed grant sees the versions of exactly the keys GetKey shows it.
    "ListKeyVersions": (P.READ_KEYS,),
}


# Calls on the whole tenant: a label-narrowed grant does not allow them. The audit trail is the tenant's,
# whatever keys its records name.
TENANT_WIDE = frozenset({"ScheduleTenantDestruction", "CancelTenantDestruction", "ReadAuditLog"})


class KeyLabels(Protocol):
    def __call__(self, tenant_id: str, key_id: str) -> Mapping[str, str] | None:
        """The labels of the tenant's key; None when it has no such key, or when the key belongs to the whole
        tenant (its master key, which wraps every other key: only a grant without labels may use it)."""


@dataclass(frozen=True, slots=True)
class _KeyUse:
    """A key a call uses with one permission: named by id, or by the header of a ciphertext (or stream)."""

    permission: Permission
    key_id: str = ""
    ciphertext: bytes = b""
    stream: bool = False


def _named(permission: Permission, key_id: str, ciphertext: bytes = b"", *, stream: bool = False) -> _KeyUse:
    return _KeyUse(permission, key_id, b"" if key_id else ciphertext, stream)


def _key_uses(method: str, request: Any) -> list[_KeyUse]:
    """The keys a request names, each with the permission it is used with."""
    if method in ("Decrypt",):
        return [_named(P.DECRYPT, request.key_id, request.ciphertext)]
    if method == "DecryptStream":
        return [_named(P.DECRYPT, request.key_id, request.chunk, stream=True)]
    if method == "ReEncrypt":
        # Without a destination the ciphertext is sealed again under the key it names: encrypt is checked on it.
        return [
            _named(P.DECRYPT, request.source_key_id, request.ciphertext),
            _named(P.ENCRYPT, request.destination_key_id or request.source_key_id, request.ciphertext),
        ]
    if method == "BatchEncrypt":
        return [_named(P.ENCRYPT, item.key_id) for item in request.items]
    if method == "BatchDecrypt":
        return [_named(P.DECRYPT, item.key_id, item.ciphertext) for item in request.items]
    if method in ("CreateKey", "GenerateSessionKey", "ListKeys", "ImportKey") or method in TENANT_WIDE:
        return []  # labels of the key to create, or a filter on the answer (see authorize)
    (permission,) = REQUIRED_PERMISSIONS[method]
    return [_KeyUse(permission, request.key_id)]


def _ciphertext_key_id(use: _KeyUse) -> str:
    """The key a ciphertext's header names; a header that does not parse fails as the handler would."""
    if use.stream:
        if len(use.ciphertext) < stream_format.HEADER_BYTES:
            # Label-narrowed callers name the key (key_id) or send the whole header in the first message.
            raise PermissionDenied(use.permission.value)
        return str(stream_format.read_header(use.ciphertext[: stream_format.HEADER_BYTES]).key_id)
    return str(codec.read_header(use.ciphertext).key_id)


def _backup_labels(backup: bytes) -> Mapping[str, str] | None:
    """The labels of the key a backup holds (none when it does not parse: the handler then refuses it); None
    for a tenant's master key, which belongs to the whole tenant whatever its labels."""
    try:
        metadata = read_backup(backup).metadata
    except CryptoServiceError:
        return {}
    return None if metadata.key_type is KeyType.MASTER else metadata.labels


ResponseFilter = Callable[[Any], Any]


def _listed_keys_filter(access: KeyAccess) -> ResponseFilter:
    def visible(response: key_service_pb2.ListKeysResponse) -> key_service_pb2.ListKeysResponse:
        # As GetKey answers: the master key is the whole tenant's, outside every narrowed grant.
        kept = [
            key for key in response.keys if key.key_type != resources_pb2.KEY_TYPE_MASTER and access.allows(key.labels)
        ]
        if len(kept) != len(response.keys):
            del response.keys[:]
            response.keys.extend(kept)
        return response

    return visible


class AccessControl:
    """Identifies callers and, when a policy is configured, decides what they may do."""

    def __init__(
        self,
        *,
        tokens: TokenVerifier | None,
        policy: WatchedFile[AccessPolicy] | None,
        key_labels: KeyLabels,
    ) -> None:
        self._tokens = tokens
        self._policy = policy
        self._key_labels = key_labels

    @property
    def enforcing(self) -> bool:
        return self._policy is not None

    def identify(self, context: grpc.ServicerContext) -> Principal:
        return principal_of(context, self._tokens)

    def authorize(self, method: str, principal: Principal, request: Any) -> ResponseFilter | None:
        """Raise Unauthenticated / PermissionDenied unless `principal` may make this call; the filter
        the answer must pass through, if any."""
        if self._policy is None:
            return None
        if principal.method == "none":
            raise Unauthenticated("this call needs an identity")
        policy = self._policy.current()
        tenant_id = request.tenant_id
        granted: dict[Permission, KeyAccess] = {}
        for permission in REQUIRED_PERMISSIONS[method]:
            access = policy.access(principal.name, tenant_id, permission)
            if access is None:
                raise PermissionDenied(permission.value)
            granted[permission] = access
        if all(access.unrestricted for access in granted.values()):
            return None
        if method in ("CreateKey", "GenerateSessionKey"):
            (access,) = granted.values()
            # A tenant's master key wraps every key of the tenant, whatever their labels: whoever made it
            # could disable or export the whole tenant.
            creates_master = method == "CreateKey" and request.key_type == resources_pb2.KEY_TYPE_MASTER
            if creates_master or not access.allows(request.labels):
                raise PermissionDenied(REQUIRED_PERMISSIONS[method][0].value)
            return None
        if method == "ListKeys":
            return _listed_keys_filter(granted[P.READ_KEYS])
        if method in TENANT_WIDE:
            # Destroying a tenant destroys every key, and its audit trail names every key, whatever their labels:
            # only a grant without labels may.
            raise PermissionDenied(REQUIRED_PERMISSIONS[method][0].value)
        if method == "ImportKey":
            # As for a new key: the labels it will carry, read from the backup (authenticated by the handler,
            # which refuses the backup if they were altered); never a master key, as CreateKey.
            labels = _backup_labels(request.backup)
            if labels is None or not granted[P.ADMIN].allows(labels):
                raise PermissionDenied(P.ADMIN.value)
        self._check_labels(tenant_id, granted, _key_uses(method, request))
        # New labels as for a new key: a label-narrowed caller must not move a key out of (or into another's)
        # reach by relabelling it.
        relabels = method == "UpdateKey" and "labels" in request.update_mask.paths
        if relabels and not granted[P.MANAGE_KEYS].allows(request.labels):
            raise PermissionDenied(P.MANAGE_KEYS.value)
        return None

    def _check_labels(self, tenant_id: str, granted: Mapping[Permission, KeyAccess], uses: Iterable[_KeyUse]) -> None:
        for use in uses:
            access = granted[use.permission]
            if access.unrestricted:
                continue
            try:
                key_id = use.key_id or _ciphertext_key_id(use)
            except DecryptionFailed:
                continue  # no key is used: the handler answers DecryptionFailed, as for anyone
            labels = self._key_labels(tenant_id, key_id)
            # A key that does not exist is refused like one outside the labels: the answer reveals nothing.
            if labels is None or not access.allows(labels):
                raise PermissionDenied(use.permission.value)


def parse_policy(raw: bytes) -> AccessPolicy:
    """A policy file's bytes (YAML, or JSON, which YAML reads too). Raises ValueError (PolicyError)."""
    try:
        document = yaml.safe_load(raw)
    except yaml.YAMLError as error:
        raise ValueError(f"not YAML or JSON: {error}") from None
    except RecursionError:
        # The parser recurses per level: a deeply nested file is refused like any unreadable one (at start,
        # exit 2; at reload, the last good policy kept), not left to fail every call.
        raise ValueError("nested too deeply to be a policy") from None
    return AccessPolicy.from_document(document)
