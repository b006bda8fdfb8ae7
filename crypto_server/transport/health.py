"""Health that follows the real dependencies, from a cheap periodic ping (never one per request).

`caas.crypto.v1.KeyService` is NOT_SERVING while the key store does not answer,
or the root key's HSM cannot be used: lifecycle calls would fail. `caas.crypto.v1.CryptoService` and the server as a
whole ("") stay SERVING: keys already in memory keep encrypting and
decrypting through a database outage, and taking every replica out of a load
balancer because the shared database is down would stop that too.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from grpc_health.v1 import health, health_pb2

from crypto_server.domain.errors import RootKeyUnavailable, StoreUnavailable
from crypto_server.storage.port import Health

log = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RootKeyProbe(Protocol):
    def check(self) -> None:
        """Raises RootKeyUnavailable when the root key cannot be used now."""
        ...


class _Dependency:
    """What KeyService health depends on (the store, the root key): its last state, logged once per change."""

    def __init__(self, back_message: str, lost_message: str) -> None:
        self._back_message = back_message
        self._lost_message = lost_message
        self._up = True

    def answered(self) -> bool:
        if not self._up:
            self._up = True
            log.info(self._back_message, extra={"health": "SERVING"})
        return True

    def failed(self, detail: str) -> bool:
        if self._up:
            self._up = False
            log.warning(self._lost_message, extra={"health": "NOT_SERVING", "detail": detail})
        return False


class StoreHealthMonitor:
    def __init__(
        self,
        store: Health,
        servicer: health.HealthServicer,
        key_service: str,
        *,
        interval_s: float,
        root_key: RootKeyProbe | None = None,
    ) -> None:
        self._store = store
        # Probing the root key is one wrap and unwrap of nothing: free for a file key, one round trip for an HSM.
        # It is also what brings an HSM back after an outage when no call needs it.
        self._root_key = root_key
        self._root_key_state = _Dependency("root key usable again", "root key unusable")
        self._servicer = servicer
        self._key_service = key_service
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._store_state = _Dependency("key store reachable again", "key store unreachable")
        self._thread = threading.Thread(target=self._run, name="store-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check_once(self) -> bool:
        try:
            self._store.ping()
            store_up = self._store_state.answered()
        except StoreUnavailable as error:
            store_up = self._store_state.failed(error.message)
        root_key_up = self._check_root_key()
        if not self._stopping.is_set():
            self._servicer.set(self._key_service, SERVING if store_up and root_key_up else NOT_SERVING)
        return store_up and root_key_up

    def _check_root_key(self) -> bool:
        if self._root_key is None:
            return True
        try:
            self._root_key.check()
        except RootKeyUnavailable as error:
            return self._root_key_state.failed(error.detail)
        return self._root_key_state.answered()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self.check_once()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 10)
