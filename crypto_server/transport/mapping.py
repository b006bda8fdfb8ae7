"""The one place that converts between protobuf messages and domain values."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from crypto_client.v1 import key_service_pb2, resources_pb2
from crypto_server.domain.algorithms import Algorithm
from crypto_server.domain.errors import InvalidArgument
from crypto_server.domain.keys import Key, KeyState, KeyType, KeyVersion, KeyVersionState

_KEY_TYPE_TO_PROTO = {
    KeyType.MASTER: resources_pb2.KEY_TYPE_MASTER,
    KeyType.DATA: resources_pb2.KEY_TYPE_DATA,
    KeyType.SESSION: resources_pb2.KEY_TYPE_SESSION,
}
_KEY_TYPE_FROM_PROTO: dict[int, KeyType] = {number: key_type for key_type, number in _KEY_TYPE_TO_PROTO.items()}
_KEY_STATE_TO_PROTO = {
    KeyState.ENABLED: resources_pb2.KEY_STATE_ENABLED,
    KeyState.DISABLED: resources_pb2.KEY_STATE_DISABLED,
    KeyState.EXPIRED: resources_pb2.KEY_STATE_EXPIRED,
}
# ListKeys filters on these three only (the stores index the disabled flag and the primary's expiry).
_KEY_STATE_FROM_PROTO: dict[int, KeyState] = {number: state for state, number in _KEY_STATE_TO_PROTO.items()}
_KEY_STATE_TO_PROTO.update(
    {
        KeyState.DESTROY_SCHEDULED: resources_pb2.KEY_STATE_DESTROY_SCHEDULED,
        KeyState.DESTROYED: resources_pb2.KEY_STATE_DESTROYED,
    }
)
_VERSION_STATE_TO_PROTO = {
    KeyVersionState.ENABLED: resources_pb2.KEY_VERSION_STATE_ENABLED,
    KeyVersionState.EXPIRED: resources_pb2.KEY_VERSION_STATE_EXPIRED,
    KeyVersionState.DISABLED: resources_pb2.KEY_VERSION_STATE_DISABLED,
    KeyVersionState.DESTROY_SCHEDULED: resources_pb2.KEY_VERSION_STATE_DESTROY_SCHEDULED,
    KeyVersionState.DESTROYED: resources_pb2.KEY_VERSION_STATE_DESTROYED,
}


def key_type_from_proto(value: int) -> KeyType:
    key_type = _KEY_TYPE_FROM_PROTO.get(value)
    if key_type is None:
        raise InvalidArgument("key_type", "must be KEY_TYPE_MASTER, KEY_TYPE_DATA or KEY_TYPE_SESSION")
    return key_type


def key_type_filter_from_proto(value: int) -> KeyType | None:
    """A ListKeys filter: UNSPECIFIED means any type."""
    return None if value == resources_pb2.KEY_TYPE_UNSPECIFIED else key_type_from_proto(value)


# Algorithms map by name: Algorithm("X") is ALGORITHM_X in the proto enum, so an algorithm added to the
# registry (domain/key_managers/) needs its enum value in resources.proto and nothing here.
_ALGORITHM_PREFIX = "ALGORITHM_"


def algorithm_from_proto(value: int) -> Algorithm:
    """UNSPECIFIED means the default, AES-256-GCM. Whether this server has the algorithm is the service's
    question (key_lifecycle.py): here only whether the API names it."""
    if value == resources_pb2.ALGORITHM_UNSPECIFIED:
        return Algorithm.AES_256_GCM
    named = resources_pb2.Algorithm.DESCRIPTOR.values_by_number.get(value)
    if named is None:
        names = ", ".join(
            v.name for v in resources_pb2.Algorithm.DESCRIPTOR.values if v.number != resources_pb2.ALGORITHM_UNSPECIFIED
        )
        raise InvalidArgument("algorithm", f"must be one of {names}")
    return Algorithm(named.name.removeprefix(_ALGORITHM_PREFIX))


def algorithm_to_proto(algorithm: Algorithm) -> resources_pb2.Algorithm.ValueType:
    """ALGORITHM_UNSPECIFIED for an algorithm the API does not name (registered on this server without its
    enum value): the key is still listed and usable by id, never misnamed as another algorithm."""
    try:
        return resources_pb2.Algorithm.Value(_ALGORITHM_PREFIX + algorithm.value)
    except ValueError:
        return resources_pb2.ALGORITHM_UNSPECIFIED


def key_state_filter_from_proto(value: int) -> KeyState | None:
    if value == resources_pb2.KEY_STATE_UNSPECIFIED:
        return None
    state = _KEY_STATE_FROM_PROTO.get(value)
    if state is None:
        raise InvalidArgument("state", "must be KEY_STATE_ENABLED, KEY_STATE_DISABLED or KEY_STATE_EXPIRED")
    return state


# Durations beyond this cannot be meaningful for a key and would overflow datetime arithmetic.
_MAX_DURATION_SECONDS = 10_000 * 365 * 24 * 3600


def duration_from_proto(message: Duration, field: str) -> timedelta:
    if not (0 <= message.seconds <= _MAX_DURATION_SECONDS) or not (0 <= message.nanos < 1_000_000_000):
        raise InvalidArgument(field, "must be a positive duration")
    # Milliseconds: the precision of key timestamps (see to_key_precision).
    return timedelta(seconds=message.seconds, milliseconds=message.nanos // 1_000_000)


def _timestamp(moment: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def timestamp(moment: datetime) -> Timestamp:
    return _timestamp(moment)


def key_to_proto(key: Key, now: datetime) -> resources_pb2.Key:
    """A key's metadata as seen at `now`. Never key material."""
    message = resources_pb2.Key(
        key_id=key.key_id,
        tenant_id=key.tenant_id,
        key_type=_KEY_TYPE_TO_PROTO[key.key_type],
        state=_KEY_STATE_TO_PROTO[key.state_at(now)],
        primary_version=key.primary_version,
        created_at=_timestamp(key.created_at),
        labels=dict(key.labels),
        algorithm=algorithm_to_proto(key.algorithm),
        min_decryption_version=key.min_decryption_version,
        # Versions are numbered 1 to the primary, one per rotation (a pending one above it is not the key's).
        version_count=key.primary_version,
    )
    if key.expires_at is not None:
        message.expires_at.CopyFrom(_timestamp(key.expires_at))
    if key.policy.rotation_period is not None:
        message.rotation_period.FromTimedelta(key.policy.rotation_period)
    if key.next_rotation_at is not None:
        message.next_rotation_at.CopyFrom(_timestamp(key.next_rotation_at))
    message.versions.extend(key_version_to_proto(key, version, now) for version in key.versions)
    return message


def key_version_to_proto(key: Key, version: KeyVersion, now: datetime) -> resources_pb2.KeyVersion:
    """One of `key`'s versions as seen at `now`, in its effective state (Key.version_state_at). Never material."""
    item = resources_pb2.KeyVersion(
        version=version.version,
        state=_VERSION_STATE_TO_PROTO[key.version_state_at(version, now)],
        created_at=_timestamp(version.created_at),
        encryptions=version.encryptions,
    )
    if version.expires_at is not None:
        item.expires_at.CopyFrom(_timestamp(version.expires_at))
    if version.destroy_at is not None:
        item.destroy_at.CopyFrom(_timestamp(version.destroy_at))
    if version.destroyed_at is not None:
        item.destroyed_at.CopyFrom(_timestamp(version.destroyed_at))
    return item


def optional_duration_from_proto(message: Any, field: str) -> timedelta | None:
    """A Duration field of `message` if it is set, else None (the default)."""
    return duration_from_proto(getattr(message, field), field) if message.HasField(field) else None


def audit_record_to_proto(record: Mapping[str, Any]) -> key_service_pb2.AuditRecord:
    """A stored audit record (service/audit.py, AuditEvent) as the API shows it."""

    def text(name: str) -> str:
        value = record.get(name)
        return value if isinstance(value, str) else ""

    def number(name: str) -> int:
        value = record.get(name)
        return value if isinstance(value, int) and value >= 0 else 0

    message = key_service_pb2.AuditRecord(
        chain_id=text("chain"),
        sequence=number("seq"),
        principal=text("principal"),
        auth_method=text("auth"),
        tenant_id=text("tenant"),
        rpc=text("rpc"),
        key_id=text("key_id"),
        key_version=number("key_version"),
        outcome=text("outcome"),
        phase=text("phase"),
        request_id=text("request_id"),
        peer=text("peer"),
    )
    with contextlib.suppress(ValueError):
        message.time.CopyFrom(_timestamp(datetime.fromisoformat(text("time"))))
    return message
