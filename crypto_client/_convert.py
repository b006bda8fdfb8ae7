"""The client's one place that converts between protobuf messages and its dataclasses."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp

from crypto_client.models import (
    Algorithm,
    AuditRecord,
    Key,
    KeyState,
    KeyType,
    KeyVersion,
    KeyVersionState,
    SessionKey,
)
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2

KEY_TYPE_TO_PROTO = {
    KeyType.MASTER: resources_pb2.KEY_TYPE_MASTER,
    KeyType.DATA: resources_pb2.KEY_TYPE_DATA,
    KeyType.SESSION: resources_pb2.KEY_TYPE_SESSION,
}
KEY_STATE_TO_PROTO = {
    KeyState.ENABLED: resources_pb2.KEY_STATE_ENABLED,
    KeyState.DISABLED: resources_pb2.KEY_STATE_DISABLED,
    KeyState.EXPIRED: resources_pb2.KEY_STATE_EXPIRED,
}
ALGORITHM_TO_PROTO = {
    Algorithm.AES_256_GCM: resources_pb2.ALGORITHM_AES_256_GCM,
    Algorithm.HMAC_SHA256: resources_pb2.ALGORITHM_HMAC_SHA256,
    Algorithm.ED25519: resources_pb2.ALGORITHM_ED25519,
    Algorithm.ECDSA_P256_SHA256: resources_pb2.ALGORITHM_ECDSA_P256_SHA256,
}
ALGORITHM_FROM_PROTO = {number: algorithm for algorithm, number in ALGORITHM_TO_PROTO.items()}
_KEY_TYPE_FROM_PROTO = {number: kind for kind, number in KEY_TYPE_TO_PROTO.items()}
_KEY_STATE_FROM_PROTO = {
    **{number: state for state, number in KEY_STATE_TO_PROTO.items()},
    resources_pb2.KEY_STATE_DESTROY_SCHEDULED: KeyState.DESTROY_SCHEDULED,
    resources_pb2.KEY_STATE_DESTROYED: KeyState.DESTROYED,
}
_VERSION_STATE_FROM_PROTO = {
    resources_pb2.KEY_VERSION_STATE_ENABLED: KeyVersionState.ENABLED,
    resources_pb2.KEY_VERSION_STATE_DISABLED: KeyVersionState.DISABLED,
    resources_pb2.KEY_VERSION_STATE_EXPIRED: KeyVersionState.EXPIRED,
    resources_pb2.KEY_VERSION_STATE_DESTROY_SCHEDULED: KeyVersionState.DESTROY_SCHEDULED,
    resources_pb2.KEY_VERSION_STATE_DESTROYED: KeyVersionState.DESTROYED,
}


def duration(value: timedelta) -> Duration:
    message = Duration()
    message.FromTimedelta(value)
    return message


def _moment(stamp: Timestamp) -> datetime:
    return stamp.ToDatetime(tzinfo=UTC)


def key_from_proto(message: resources_pb2.Key) -> Key:
    return Key(
        key_id=message.key_id,
        tenant_id=message.tenant_id,
        key_type=_KEY_TYPE_FROM_PROTO[message.key_type],
        state=_KEY_STATE_FROM_PROTO[message.state],
        primary_version=message.primary_version,
        versions=tuple(key_version_from_proto(v) for v in message.versions),
        created_at=_moment(message.created_at),
        expires_at=_moment(message.expires_at) if message.HasField("expires_at") else None,
        rotation_period=message.rotation_period.ToTimedelta() if message.HasField("rotation_period") else None,
        labels=dict(message.labels),
        algorithm=ALGORITHM_FROM_PROTO.get(message.algorithm, Algorithm.AES_256_GCM),
        next_rotation_at=_moment(message.next_rotation_at) if message.HasField("next_rotation_at") else None,
        min_decryption_version=message.min_decryption_version,
        version_count=message.version_count,
    )


def key_version_from_proto(message: resources_pb2.KeyVersion) -> KeyVersion:
    return KeyVersion(
        version=message.version,
        state=_VERSION_STATE_FROM_PROTO[message.state],
        created_at=_moment(message.created_at),
        expires_at=_moment(message.expires_at) if message.HasField("expires_at") else None,
        encryptions=message.encryptions,
        destroy_at=_moment(message.destroy_at) if message.HasField("destroy_at") else None,
        destroyed_at=_moment(message.destroyed_at) if message.HasField("destroyed_at") else None,
    )


def new_request_id() -> str:
    """A request id for a call that names none: the same on every attempt, so a retry after a lost response
    creates nothing new."""
    return uuid.uuid4().hex


def session_key(message: resources_pb2.Key, material: bytes, *, version: int) -> SessionKey:
    key = key_from_proto(message)
    return SessionKey(key=key, key_material=material, key_version=version or key.primary_version)


def audit_record_from_proto(message: key_pb.AuditRecord) -> AuditRecord:
    return AuditRecord(
        chain_id=message.chain_id,
        sequence=message.sequence,
        time=_moment(message.time) if message.HasField("time") else None,
        principal=message.principal,
        auth_method=message.auth_method,
        tenant_id=message.tenant_id,
        rpc=message.rpc,
        key_id=message.key_id,
        key_version=message.key_version,
        outcome=message.outcome,
        phase=message.phase,
        request_id=message.request_id,
        peer=message.peer,
    )
