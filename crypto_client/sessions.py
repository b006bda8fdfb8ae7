"""SessionKeys: short-lived keys for calls and rooms in the realtime socket service.

`open(room_id)` creates the room's session key (idempotent for the same
`attempt_id`, so a retried or duplicated open makes one key); `fetch(key_id)`
returns it to the other participants while it is valid. Fetched material is
kept in memory until the key expires, so a busy room asks the service once per
process.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from crypto_client.models import SessionKey
from crypto_client.sync_client import CryptoClient


class SessionKeys:
    def __init__(
        self,
        client: CryptoClient,
        *,
        lifetime: timedelta = timedelta(hours=24),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._client = client
        self._lifetime = lifetime
        self._clock = clock
        self._held: dict[str, SessionKey] = {}
        self._lock = threading.Lock()

    def open(self, room_id: str, *, attempt_id: str | None = None) -> SessionKey:
        """A new session key for `room_id` (labelled with it). Pass the same `attempt_id` when
        repeating an open whose answer was lost: the service then returns the same key."""
        request_id = f"room:{room_id}:{attempt_id}" if attempt_id else None
        session = self._client.generate_session_key(
            expire_after=self._lifetime, labels={"room": room_id[:256]}, request_id=request_id
        )
        self._hold(session)
        return session

    def fetch(self, key_id: str) -> SessionKey:
        """The session key `key_id`, from memory while it is unexpired, else from the service."""
        with self._lock:
            held = self._held.get(key_id)
        if held is not None and (held.key.expires_at is None or held.key.expires_at > self._clock()):
            return held
        session = self._client.get_session_key(key_id)
        self._hold(session)
        return session

    def forget(self, key_id: str) -> None:
        """Drop the material from memory (e.g. when the call ends)."""
        with self._lock:
            self._held.pop(key_id, None)

    def _hold(self, session: SessionKey) -> None:
        with self._lock:
            self._held[session.key.key_id] = session
