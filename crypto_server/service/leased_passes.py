"""Background work done in passes by one server of the deployment at a time, under a lease in the store.

The key rotator and the key destroyer are both this: each server runs a pass every `interval_s`, and a pass
starts by taking (or renewing) the lease `lease_name` in the store (`acquire_lease`, an atomic write); only
the holder works. A holder that dies stops renewing, and another server takes the lease once it has run
out: the work stops for at most `lease_ttl + interval`. A clean shutdown gives the lease up at once.

A pass handles at most `batch` due keys, so a backlog drains over several passes instead of holding one pass
longer than the lease. One key that cannot be handled now must not stop the others: it stays due and is
tried again on the next pass. Each change is written to the audit trail before it is made (principal
`system`).
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import datetime, timedelta

from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import CryptoServiceError, StoreUnavailable
from crypto_server.service.audit import AuditEvent, AuditTrail
from crypto_server.service.periodic import Periodic
from crypto_server.storage.port import Leases

log = logging.getLogger(__name__)

SYSTEM_PRINCIPAL = "system"


@dataclass(frozen=True, slots=True)
class PassSchedule:
    """How often a server runs a pass (0: never), and how long a lease lasts: longer than the interval, or the
    holder would lose it between two passes."""

    interval_s: float
    lease_ttl_s: float

    def __post_init__(self) -> None:
        if self.interval_s > 0 and self.lease_ttl_s <= self.interval_s:
            raise ValueError("a lease must last longer than the interval between passes")


class LeasedPasses(ABC):
    """Subclasses name the lease and the work (`lease_name`, `work`), find the due keys and handle one."""

    lease_name: str
    work: str  # what the passes do, in log lines: "automatic rotation", "scheduled destruction"
    default_batch: int

    def __init_subclass__(cls, *, lease_name: str, work: str, default_batch: int) -> None:
        super().__init_subclass__()
        cls.lease_name, cls.work, cls.default_batch = lease_name, work, default_batch

    def __init__(self, leases: Leases, clock: Clock, schedule: PassSchedule, audit: AuditTrail | None) -> None:
        self._leases = leases
        self._clock = clock
        self._lease_ttl = timedelta(seconds=schedule.lease_ttl_s)
        self._audit = audit
        self._batch = self.default_batch
        self.holder = f"{self.lease_name.removeprefix('key-')}-{uuid.uuid4()}"
        self._passes = Periodic(
            self.run_once,
            schedule.interval_s,
            name=self.lease_name,
            skipped=f"{self.work} skipped a pass: the key store is unavailable",
        )

    @abstractmethod
    def _due(self, now: datetime, limit: int) -> list[tuple[str, str]]:
        """(tenant_id, key_id) of up to `limit` keys due at `now`, from the store's index."""

    @abstractmethod
    def _handle(self, tenant_id: str, key_id: str) -> int:
        """Do the work on one due key (re-checking its authenticated metadata); how many changes it made."""

    def run_once(self) -> int:
        """One pass: take (or renew) the lease, then handle the keys that are due. The number of changes."""
        now = self._clock.now()
        if not self._leases.acquire_lease(self.lease_name, self.holder, now, self._lease_ttl):
            return 0
        changes = 0
        for tenant_id, key_id in self._due(now, self._batch):
            try:
                changes += self._handle(tenant_id, key_id)
            except StoreUnavailable:
                raise
            except CryptoServiceError as error:
                # Its tenant's master key disabled, the audit trail down, a store altered: this key stays due.
                log.warning(
                    f"{self.work} failed; retried on the next pass",
                    extra={"tenant_id": tenant_id, "key_id": key_id, "error": type(error).__name__},
                )
            except Exception:
                # One key's unexpected failure (a defect, a row no check foresaw) must not stop the pass for the
                # keys after it; this one stays due.
                log.exception(
                    f"{self.work} failed unexpectedly; retried on the next pass",
                    extra={"tenant_id": tenant_id, "key_id": key_id},
                )
        return changes

    def _record(
        self, rpc: str, tenant_id: str, key_id: str, outcome: str, *, request_id: str = "", version: int = 0
    ) -> None:
        """Written at once, as for the RPC it stands for: nothing is changed unless its intent is in the trail."""
        if self._audit is None:
            return
        self._audit.record(
            AuditEvent(
                rpc=rpc,
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
        """Stop the thread and give the lease up, so another server takes over at its next pass (once)."""
        if not self._passes.stop():
            return
        with contextlib.suppress(StoreUnavailable):  # if it cannot be given up, it runs out by itself
            self._leases.release_lease(self.lease_name, self.holder)
