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

import contextlib
import logging
import uuid
from datetime import timedelta
from typing import Protocol

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import CryptoServiceError, StoreUnavailable
from crypto_server.service.audit import AuditEvent, AuditTrail
from crypto_server.service.key_destruction import KeyDestruction
from crypto_server.service.periodic import Periodic
from crypto_server.storage.port import DestructionSchedule, Leases

log = logging.getLogger(__name__)

LEASE_NAME = "key-destroyer"
SYSTEM_PRINCIPAL = "system"
AUDIT_RPC = "DestroyKeyVersions"
# Keys handled per pass at most; a backlog drains over several passes instead of outliving the lease.
DEFAULT_BATCH = 100


class DestroyerStore(DestructionSchedule, Leases, Protocol):
    """What the destroyer asks the store: its lease, and the keys due (destructions themselves go through
    KeyDestruction, over the key records' integrity check and cache)."""


class KeyDestroyer:
    def __init__(
        self,
        store: DestroyerStore,
        destruction: KeyDestruction,
        clock: Clock,
        *,
        interval_s: float,
        lease_ttl_s: float,
        audit: AuditTrail | None = None,
        batch: int = DEFAULT_BATCH,
        holder: str | None = None,
    ) -> None:
        if interval_s > 0 and lease_ttl_s <= interval_s:
            raise ValueError("the destruction lease must last longer than the interval between passes")
        self._store = store
        self._destruction = destruction
        self._clock = clock
        self._lease_ttl = timedelta(seconds=lease_ttl_s)
        self._audit = audit
        self._batch = batch
        self.holder = holder or f"destroyer-{uuid.uuid4()}"
        self._passes = Periodic(
            self.run_once,
            interval_s,
            name="key-destroyer",
            skipped="scheduled destruction skipped a pass: the key store is unavailable",
        )

    def run_once(self) -> int:
        """One pass: take (or renew) the lease, then destroy what is due. The number of versions destroyed."""
        now = self._clock.now()
        if not self._store.acquire_lease(LEASE_NAME, self.holder, now, self._lease_ttl):
            return 0
        destroyed = 0
        for tenant_id, key_id in self._store.keys_due_for_destruction(now, self._batch):
            try:
                destroyed += self._destroy(tenant_id, key_id)
            except StoreUnavailable:
                raise
            except CryptoServiceError as error:
                # One key that cannot be destroyed now (the audit trail down, a store altered) must not stop
                # the others; it stays due and is tried again on the next pass.
                log.warning(
                    "scheduled destruction failed; retried on the next pass",
                    extra={"tenant_id": tenant_id, "key_id": key_id, "error": type(error).__name__},
                )
        return destroyed

    def _destroy(self, tenant_id: str, key_id: str) -> int:
        self._record(tenant_id, key_id, "PENDING")
        try:
            versions = self._destruction.destroy_due(tenant_id, key_id)
        except CryptoServiceError as error:
            self._record(tenant_id, key_id, type(error).__name__)
            raise
        self._record(tenant_id, key_id, "OK")
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

    def _record(self, tenant_id: str, key_id: str, outcome: str) -> None:
        """Written at once: no material is erased unless the intent is in the trail."""
        if self._audit is None:
            return
        self._audit.record(
            AuditEvent(
                rpc=AUDIT_RPC,
                tenant=tenant_id,
                principal=SYSTEM_PRINCIPAL,
                auth=SYSTEM_PRINCIPAL,
                outcome=outcome,
                request_id="",
                peer="",
                key_id=key_id,
                key_version=0,
                phase="intent" if outcome == "PENDING" else "outcome",
            )
        )

    # -- the background thread ---------------------------------------------------

    def start(self) -> None:
        """Run a pass every `interval_s` on a thread of its own (not at all when the interval is 0)."""
        self._passes.start()

    def stop(self) -> None:
        """Stop the thread and give the lease up, so another server takes over at its next pass (once)."""
        if not self._passes.stop():
            return
        with contextlib.suppress(StoreUnavailable):
            self._store.release_lease(LEASE_NAME, self.holder)
