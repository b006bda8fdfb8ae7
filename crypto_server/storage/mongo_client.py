"""The one way this service connects to MongoDB: the key store and the audit sink get the same driver options.

What each option is for (docs/storage.md, docs/reliability.md):

- `serverSelectionTimeoutMS`, `connectTimeoutMS`, `socketTimeoutMS`: the store timeout; every operation is
  further bounded by the calling RPC's deadline (`pymongo.timeout`, in the callers).
- `retryWrites`, `retryReads`: the driver retries a write or read once after a fail-over error or a dropped
  connection; a retried write is applied once (the server deduplicates it by its transaction number).
- `serverMonitoringMode="poll"`: after a fail-over error (NotWritablePrimary, InterruptedDueToReplStateChange,
  ShutdownInProgress, ...) the driver marks the server Unknown and asks its monitor to look again at once; a
  polling monitor does so within minHeartbeatFrequencyMS (0.5 s), and the retry above then succeeds. The
  default streaming monitor is blocked in an awaitable `hello` that only returns when the server's
  topologyVersion changes or after heartbeatFrequencyMS (10 s): one such error whose server did not change
  (a transient error, or a step-down the driver hears of first through a command) left every operation
  failing server selection for up to 10 s (docs/reliability.md, defect 9). heartbeatFrequencyMS stays at its
  default: with polling it is only how often an idle client looks, since an operation that finds no suitable
  server wakes every monitor itself.
- `w="majority"`, `journal=True`, `readConcernLevel="majority"`: an acknowledged write survives a crash and a
  fail-over, and no read returns a write a fail-over could roll back.
"""

from __future__ import annotations

from typing import Any

from pymongo import MongoClient

# The names the clients give the server (`client.application.name`): in its logs, and what a test's fail
# point is scoped to.
STORE_APP_NAME = "caas-crypto"
AUDIT_APP_NAME = "caas-crypto-audit"


def mongo_client(uri: str, *, timeout_s: float, app_name: str) -> MongoClient[dict[str, Any]]:
    timeout_ms = int(timeout_s * 1000)
    return MongoClient(
        uri,
        tz_aware=True,
        appname=app_name,
        serverSelectionTimeoutMS=timeout_ms,
        connectTimeoutMS=timeout_ms,
        socketTimeoutMS=timeout_ms,
        retryWrites=True,
        retryReads=True,
        serverMonitoringMode="poll",
        # An acknowledged key must survive a crash of the database and a fail-over: written to the journal of a
        # majority of the replica set before it is acknowledged (without it, SIGKILL of the test server lost the
        # last ~30 ms of acknowledged writes: confirmed keys, gone with their ciphertexts).
        w="majority",
        journal=True,
        # And never read a write that a fail-over could roll back.
        readConcernLevel="majority",
    )
