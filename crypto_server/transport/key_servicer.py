"""KeyService: thin handlers that map the request, call the lifecycle, map the key back."""

from __future__ import annotations

import grpc

from crypto_client.v1 import key_service_pb2 as pb
from crypto_client.v1 import key_service_pb2_grpc, resources_pb2
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import AuditUnavailable
from crypto_server.domain.keys import Key
from crypto_server.service.audit import AuditTrail
from crypto_server.service.key_backup import KeyBackups
from crypto_server.service.key_destruction import KeyDestruction
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.transport.mapping import (
    algorithm_from_proto,
    audit_record_to_proto,
    duration_from_proto,
    key_state_filter_from_proto,
    key_to_proto,
    key_type_filter_from_proto,
    key_type_from_proto,
    key_version_to_proto,
    optional_duration_from_proto,
    timestamp,
)


class KeyServicer(key_service_pb2_grpc.KeyServiceServicer):
    def __init__(
        self,
        lifecycle: KeyLifecycle,
        clock: Clock,
        audit: AuditTrail | None,
        backups: KeyBackups,
        destruction: KeyDestruction,
    ) -> None:
        self._lifecycle = lifecycle
        self._clock = clock
        self._audit = audit
        self._destruction = destruction
        self._backups = backups

    def _key(self, key: Key) -> resources_pb2.Key:
        return key_to_proto(key, self._clock.now())

    def CreateKey(self, request: pb.CreateKeyRequest, context: grpc.ServicerContext) -> pb.CreateKeyResponse:
        key = self._lifecycle.create_key(
            request.tenant_id,
            key_type_from_proto(request.key_type),
            expire_after=(
                duration_from_proto(request.expire_after, "expire_after") if request.HasField("expire_after") else None
            ),
            rotation_period=(
                duration_from_proto(request.rotation_period, "rotation_period")
                if request.HasField("rotation_period")
                else None
            ),
            labels=dict(request.labels),
            request_id=request.request_id,
            algorithm=algorithm_from_proto(request.algorithm),
        )
        return pb.CreateKeyResponse(key=self._key(key))

    def GetKey(self, request: pb.GetKeyRequest, context: grpc.ServicerContext) -> pb.GetKeyResponse:
        return pb.GetKeyResponse(key=self._key(self._lifecycle.get_key(request.tenant_id, request.key_id)))

    def ListKeys(self, request: pb.ListKeysRequest, context: grpc.ServicerContext) -> pb.ListKeysResponse:
        page = self._lifecycle.list_keys(
            request.tenant_id,
            page_size=request.page_size,
            page_token=request.page_token,
            key_type=key_type_filter_from_proto(request.key_type),
            state=key_state_filter_from_proto(request.state),
        )
        now = self._clock.now()
        return pb.ListKeysResponse(
            keys=[key_to_proto(key, now) for key in page.keys], next_page_token=page.next_page_token
        )

    def RotateKey(self, request: pb.RotateKeyRequest, context: grpc.ServicerContext) -> pb.RotateKeyResponse:
        rotated = self._lifecycle.rotate_key(request.tenant_id, request.key_id, request_id=request.request_id)
        return pb.RotateKeyResponse(key=self._key(rotated))

    def UpdateKey(self, request: pb.UpdateKeyRequest, context: grpc.ServicerContext) -> pb.UpdateKeyResponse:
        updated = self._lifecycle.update_key(
            request.tenant_id,
            request.key_id,
            update_mask=list(request.update_mask.paths),
            rotation_period=(
                duration_from_proto(request.rotation_period, "rotation_period")
                if request.HasField("rotation_period")
                else None
            ),
            expire_after=(
                duration_from_proto(request.expire_after, "expire_after") if request.HasField("expire_after") else None
            ),
            labels=dict(request.labels),
            min_decryption_version=request.min_decryption_version,
        )
        return pb.UpdateKeyResponse(key=self._key(updated))

    def DisableKey(self, request: pb.DisableKeyRequest, context: grpc.ServicerContext) -> pb.DisableKeyResponse:
        return pb.DisableKeyResponse(key=self._key(self._lifecycle.disable_key(request.tenant_id, request.key_id)))

    def EnableKey(self, request: pb.EnableKeyRequest, context: grpc.ServicerContext) -> pb.EnableKeyResponse:
        return pb.EnableKeyResponse(key=self._key(self._lifecycle.enable_key(request.tenant_id, request.key_id)))

    def GenerateSessionKey(
        self, request: pb.GenerateSessionKeyRequest, context: grpc.ServicerContext
    ) -> pb.GenerateSessionKeyResponse:
        key, material = self._lifecycle.generate_session_key(
            request.tenant_id,
            expire_after=(
                duration_from_proto(request.expire_after, "expire_after") if request.HasField("expire_after") else None
            ),
            labels=dict(request.labels),
            request_id=request.request_id,
        )
        return pb.GenerateSessionKeyResponse(key=self._key(key), key_material=material)

    def GetSessionKey(
        self, request: pb.GetSessionKeyRequest, context: grpc.ServicerContext
    ) -> pb.GetSessionKeyResponse:
        key, material = self._lifecycle.get_session_key(request.tenant_id, request.key_id)
        return pb.GetSessionKeyResponse(key=self._key(key), key_material=material, key_version=key.primary_version)

    def ReadAuditLog(self, request: pb.ReadAuditLogRequest, context: grpc.ServicerContext) -> pb.ReadAuditLogResponse:
        if self._audit is None:
            raise AuditUnavailable("this server keeps no audit trail")
        records, next_token = self._audit.page(request.tenant_id, request.page_token, request.page_size)
        return pb.ReadAuditLogResponse(
            records=[audit_record_to_proto(record) for record in records], next_page_token=next_token
        )

    # -- versions and destruction ---------------------------------------------------

    def DisableKeyVersion(
        self, request: pb.DisableKeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.DisableKeyVersionResponse:
        key = self._destruction.disable_version(request.tenant_id, request.key_id, request.version)
        return pb.DisableKeyVersionResponse(key=self._key(key))

    def EnableKeyVersion(
        self, request: pb.EnableKeyVersionRequest, context: grpc.ServicerContext
    ) -> pb.EnableKeyVersionResponse:
        key = self._destruction.enable_version(request.tenant_id, request.key_id, request.version)
        return pb.EnableKeyVersionResponse(key=self._key(key))

    def ScheduleKeyVersionDestruction(
        self, request: pb.ScheduleKeyVersionDestructionRequest, context: grpc.ServicerContext
    ) -> pb.ScheduleKeyVersionDestructionResponse:
        key = self._destruction.schedule_version_destruction(
            request.tenant_id,
            request.key_id,
            request.version,
            optional_duration_from_proto(request, "waiting_period"),
        )
        return pb.ScheduleKeyVersionDestructionResponse(key=self._key(key))

    def ScheduleKeyDestruction(
        self, request: pb.ScheduleKeyDestructionRequest, context: grpc.ServicerContext
    ) -> pb.ScheduleKeyDestructionResponse:
        key = self._destruction.schedule_key_destruction(
            request.tenant_id, request.key_id, optional_duration_from_proto(request, "waiting_period")
        )
        return pb.ScheduleKeyDestructionResponse(key=self._key(key))

    def CancelKeyDestruction(
        self, request: pb.CancelKeyDestructionRequest, context: grpc.ServicerContext
    ) -> pb.CancelKeyDestructionResponse:
        key = self._destruction.cancel_key_destruction(request.tenant_id, request.key_id, request.version)
        return pb.CancelKeyDestructionResponse(key=self._key(key))

    def ScheduleTenantDestruction(
        self, request: pb.ScheduleTenantDestructionRequest, context: grpc.ServicerContext
    ) -> pb.ScheduleTenantDestructionResponse:
        master = self._destruction.schedule_tenant_destruction(
            request.tenant_id, optional_duration_from_proto(request, "waiting_period")
        )
        response = pb.ScheduleTenantDestructionResponse(master_key=self._key(master))
        destroy_at = master.primary.destroy_at
        if destroy_at is not None:
            response.destroy_at.CopyFrom(timestamp(destroy_at))
        return response

    def CancelTenantDestruction(
        self, request: pb.CancelTenantDestructionRequest, context: grpc.ServicerContext
    ) -> pb.CancelTenantDestructionResponse:
        master = self._destruction.cancel_tenant_destruction(request.tenant_id)
        return pb.CancelTenantDestructionResponse(master_key=self._key(master))

    def ExportKey(self, request: pb.ExportKeyRequest, context: grpc.ServicerContext) -> pb.ExportKeyResponse:
        key, backup = self._backups.export_key(
            request.tenant_id, request.key_id, backup_public_key=request.backup_public_key
        )
        return pb.ExportKeyResponse(backup=backup, key=self._key(key))

    def ImportKey(self, request: pb.ImportKeyRequest, context: grpc.ServicerContext) -> pb.ImportKeyResponse:
        return pb.ImportKeyResponse(key=self._key(self._backups.import_key(request.tenant_id, request.backup)))

    def ListKeyVersions(
        self, request: pb.ListKeyVersionsRequest, context: grpc.ServicerContext
    ) -> pb.ListKeyVersionsResponse:
        page = self._lifecycle.list_key_versions(
            request.tenant_id, request.key_id, page_size=request.page_size, page_token=request.page_token
        )
        now = self._clock.now()
        return pb.ListKeyVersionsResponse(
            versions=[key_version_to_proto(page.key, version, now) for version in page.versions],
            next_page_token=page.next_page_token,
        )
