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
        self._root_key_up = True
        self._servicer = servicer
        self._key_service = key_service
        self._interval_s = interval_s
        self._stopping = threading.Event()
        self._store_up = True
        self._thread = threading.Thread(target=self._run, name="store-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def check_once(self) -> bool:
        try:
            self._store.ping()
            up = True
        except StoreUnavailable as error:
            up = False
            detail = error.message
        if up != self._store_up:
            self._store_up = up
            if up:
                log.info("key store reachable again", extra={"health": "SERVING"})
            else:
                log.warning("key store unreachable", extra={"health": "NOT_SERVING", "detail": detail})
        root_key_up = self._check_root_key()
        if not self._stopping.is_set():
            self._servicer.set(self._key_service, SERVING if up and root_key_up else NOT_SERVING)
        return up and root_key_up

    def _check_root_key(self) -> bool:
        if self._root_key is None:
            return True
        try:
            self._root_key.check()
            up = True
        except RootKeyUnavailable as error:
            up = False
            detail = error.detail
        if up != self._root_key_up:
            self._root_key_up = up
            if up:
                log.info("root key usable again", extra={"health": "SERVING"})
            else:
                log.warning("root key unusable", extra={"health": "NOT_SERVING", "detail": detail})
        return up

    def _run(self) -> None:
        while not self._stopping.wait(self._interval_s):
            self.check_once()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self._interval_s + 10)
