"""Automatic rotation: keys whose `next_rotation_at` has come get a new primary version.

One rotator runs per deployment however many replicas there are: each replica's
rotator takes a lease in the store (`acquire_lease`, an atomic write) before
each pass and only the holder rotates. The holder renews the lease on every
pass; a holder that dies stops renewing, and another replica takes the lease
once it has run out: rotation stops for at most `lease_ttl + interval`. A clean
shutdown gives the lease up at once.

A rotation is RotateKey's: `KeyLifecycle.rotate_key`, with its invalidation of
every replica's copy, recorded in the audit trail before it is made (principal
`system`, rpc `RotateKey`) and logged. Its request id names the version it
creates, so two rotators that both find a key due (the lease changed hands while
the old holder was mid-pass) make one version between them.

A key whose primary version reaches its usage soft limit is due at once, whatever its rotation period: the
reservation that takes it there sets its stored next rotation time to now (service/usage_budget.py), and
the rotator re-checks the count in the key it loads.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Protocol

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import CryptoServiceError
from crypto_server.service.audit import AuditTrail
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.leased_passes import SYSTEM_PRINCIPAL, LeasedPasses, PassSchedule
from crypto_server.storage.port import Leases, RotationSchedule

log = logging.getLogger(__name__)

LEASE_NAME = "key-rotator"
# Keys rotated per pass at most: a backlog (a store restored from an old backup) drains over several passes
# instead of holding one pass longer than the lease.
DEFAULT_BATCH = 200


class RotatorStore(RotationSchedule, Leases, Protocol):
    """What the rotator asks the store: its lease, and the keys due (rotations themselves go through the
    lifecycle)."""


class KeyRotator(LeasedPasses, lease_name=LEASE_NAME, work="automatic rotation", default_batch=DEFAULT_BATCH):
    def __init__(
        self,
        store: RotatorStore,
        lifecycle: KeyLifecycle,
        clock: Clock,
        schedule: PassSchedule,
        *,
        audit: AuditTrail | None = None,
        usage_soft_limit: int | None = None,
    ) -> None:
        super().__init__(store, clock, schedule, audit)
        self._store = store
        self._lifecycle = lifecycle
        self._usage_soft_limit = usage_soft_limit

    def _due(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self._store.keys_due_for_rotation(now, limit)

    def _handle(self, tenant_id: str, key_id: str) -> int:
        request_id = self._lifecycle.automatic_rotation_request(tenant_id, key_id, self._usage_soft_limit)
        if request_id is None:
            return 0
        self._record("RotateKey", tenant_id, key_id, "PENDING", request_id=request_id)
        try:
            key = self._lifecycle.rotate_key(tenant_id, key_id, request_id=request_id)
        except CryptoServiceError as error:
            self._record("RotateKey", tenant_id, key_id, type(error).__name__, request_id=request_id)
            raise
        self._record("RotateKey", tenant_id, key_id, "OK", request_id=request_id, version=key.primary_version)
        log.info(
            "key rotated automatically",
            extra={
                "rpc": "RotateKey",
                "principal": SYSTEM_PRINCIPAL,
                "tenant_id": tenant_id,
                "key_id": key_id,
                "key_version": key.primary_version,
                "request_id": request_id,
            },
        )
        return 1
