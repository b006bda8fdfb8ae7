"""The destruction pass: scheduled destructions whose time has come are carried out, by one server at a time.

As the rotator (service/key_rotator.py): each server's destroyer takes a lease
in the store before each pass and only the holder destroys; a holder that dies
stops renewing and another takes over once the lease runs out. The store finds
the due keys by an index (`keys_due_for_destruction`); each key's authenticated
metadata is re-checked before anything is erased (KeyDestruction.destroy_due).
Each destruction is recorded in the audit trail before it is made (principal
`system`, rpc `DestroyKeyVersions`), and logged.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Protocol

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import CryptoServiceError
from crypto_server.service.audit import AuditTrail
from crypto_server.service.key_destruction import KeyDestruction
from crypto_server.service.leased_passes import SYSTEM_PRINCIPAL, LeasedPasses, PassSchedule
from crypto_server.storage.port import DestructionSchedule, Leases

log = logging.getLogger(__name__)

LEASE_NAME = "key-destroyer"
AUDIT_RPC = "DestroyKeyVersions"
# Keys handled per pass at most; a backlog drains over several passes instead of outliving the lease.
DEFAULT_BATCH = 100


class DestroyerStore(DestructionSchedule, Leases, Protocol):
    """What the destroyer asks the store: its lease, and the keys due (destructions themselves go through
    KeyDestruction, over the key records' integrity check and cache)."""


class KeyDestroyer(LeasedPasses, lease_name=LEASE_NAME, work="scheduled destruction", default_batch=DEFAULT_BATCH):
    def __init__(
        self,
        store: DestroyerStore,
        destruction: KeyDestruction,
        clock: Clock,
        schedule: PassSchedule,
        *,
        audit: AuditTrail | None = None,
    ) -> None:
        super().__init__(store, clock, schedule, audit)
        self._store = store
        self._destruction = destruction

    def _due(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        return self._store.keys_due_for_destruction(now, limit)

    def _handle(self, tenant_id: str, key_id: str) -> int:
        # No material is erased unless the intent is in the trail.
        self._record(AUDIT_RPC, tenant_id, key_id, "PENDING")
        try:
            versions = self._destruction.destroy_due(tenant_id, key_id)
        except CryptoServiceError as error:
            self._record(AUDIT_RPC, tenant_id, key_id, type(error).__name__)
            raise
        self._record(AUDIT_RPC, tenant_id, key_id, "OK")
        if versions:
            log.info(
                "key versions destroyed",
                extra={
                    "rpc": AUDIT_RPC,
                    "principal": SYSTEM_PRINCIPAL,
                    "tenant_id": tenant_id,
                    "key_id": key_id,
                    "versions": versions,
                },
            )
        return len(versions)
