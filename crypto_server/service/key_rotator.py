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

import contextlib
import logging
import uuid
from datetime import timedelta
from typing import Protocol

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import CryptoServiceError, StoreUnavailable
from crypto_server.service.audit import AuditEvent, AuditTrail
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.periodic import Periodic
from crypto_server.storage.port import Leases, RotationSchedule

log = logging.getLogger(__name__)

LEASE_NAME = "key-rotator"
SYSTEM_PRINCIPAL = "system"
# Keys rotated per pass at most: a backlog (a store restored from an old backup) drains over several passes
# instead of holding one pass longer than the lease.
DEFAULT_BATCH = 200


class RotatorStore(RotationSchedule, Leases, Protocol):
    """What the rotator asks the store: its lease, and the keys due (rotations themselves go through the
    lifecycle)."""


class KeyRotator:
    def __init__(
        self,
        store: RotatorStore,
        lifecycle: KeyLifecycle,
        clock: Clock,
        *,
        interval_s: float,
        lease_ttl_s: float,
        audit: AuditTrail | None = None,
        batch: int = DEFAULT_BATCH,
        holder: str | None = None,
        usage_soft_limit: int | None = None,
    ) -> None:
        if interval_s > 0 and lease_ttl_s <= interval_s:
            raise ValueError("the rotation lease must last longer than the interval between passes")
        self._store = store
        self._lifecycle = lifecycle
        self._clock = clock
        self._interval_s = interval_s
        self._lease_ttl = timedelta(seconds=lease_ttl_s)
        self._audit = audit
        self._batch = batch
        self._usage_soft_limit = usage_soft_limit
        self.holder = holder or f"rotator-{uuid.uuid4()}"
        self._passes = Periodic(
            self.run_once,
            self._interval_s,
            name="key-rotator",
            skipped="automatic rotation skipped a pass: the key store is unavailable",
        )

    def run_once(self) -> int:
        """One pass: take (or renew) the lease, then rotate the keys that are due. The number rotated."""
        now = self._clock.now()
        if not self._store.acquire_lease(LEASE_NAME, self.holder, now, self._lease_ttl):
            return 0
        rotated = 0
        for tenant_id, key_id in self._store.keys_due_for_rotation(now, self._batch):
            try:
                rotated += self._rotate(tenant_id, key_id)
            except StoreUnavailable:
                raise
            except CryptoServiceError as error:
                # One key that cannot rotate (its tenant's master key disabled, the audit trail down) must not
                # stop the others; it stays due and is tried again on the next pass.
                log.warning(
                    "automatic rotation failed; retried on the next pass",
                    extra={"tenant_id": tenant_id, "key_id": key_id, "error": type(error).__name__},
                )
        return rotated

    def _rotate(self, tenant_id: str, key_id: str) -> int:
        request_id = self._lifecycle.automatic_rotation_request(tenant_id, key_id, self._usage_soft_limit)
        if request_id is None:
            return 0
        self._record(tenant_id, key_id, request_id, "PENDING", 0)
        try:
            key = self._lifecycle.rotate_key(tenant_id, key_id, request_id=request_id)
        except CryptoServiceError as error:
            self._record(tenant_id, key_id, request_id, type(error).__name__, 0)
            raise
        self._record(tenant_id, key_id, request_id, "OK", key.primary_version)
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

    def _record(self, tenant_id: str, key_id: str, request_id: str, outcome: str, version: int) -> None:
        """Written at once, as for RotateKey: no rotation is made unless its intent is in the trail."""
        if self._audit is None:
            return
        self._audit.record(
            AuditEvent(
                rpc="RotateKey",
                tenant=tenant_id,
                principal=SYSTEM_PRINCIPAL,
                auth=SYSTEM_PRINCIPAL,
                outcome=outcome,
                request_id=request_id,
                peer="",
                key_id=key_id,
                key_version=version,
                phase="intent" if outcome == "PENDING" else "outcome",
            )
        )

    # -- the background thread ---------------------------------------------------

    def start(self) -> None:
        """Run a pass every `interval_s` on a thread of its own (not at all when the interval is 0)."""
        self._passes.start()

    def stop(self) -> None:
        """Stop the thread and give the lease up, so another replica takes over at its next pass (once)."""
        if not self._passes.stop():
            return
        with contextlib.suppress(StoreUnavailable):  # if it cannot be given up, it runs out by itself
            self._store.release_lease(LEASE_NAME, self.holder)
