"""SessionKeys: short-lived keys for calls and rooms in the realtime socket service.

`open(room_id)` creates the room's session key (idempotent for the same
`attempt_id`, so a retried or duplicated open makes one key). An attempt id is
an unguessable token (`new_attempt_id()`): the service hands the key's material
to whoever repeats its request within the retry window, so a guessable one (a
room name, a counter) would let another caller obtain the key. `fetch(key_id)`
returns it to the other participants while it is valid. Fetched material is
kept in memory until the key expires, so a busy room asks the service once per
process.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from crypto_client._async.client import AsyncCryptoClient
from crypto_client.models import SessionKey

# 128 bits or more of base64url: what new_attempt_id() makes.
_ATTEMPT_ID = re.compile(r"[A-Za-z0-9_-]{22,120}")


def new_attempt_id() -> str:
    """An unguessable id for one open of a session key; keep it to repeat that open after a lost answer."""
    return secrets.token_urlsafe(16)


class AsyncSessionKeys:
    """Session keys of one tenant (`tenant_id`, default: the client's)."""

    def __init__(
        self,
        client: AsyncCryptoClient,
        *,
        lifetime: timedelta = timedelta(hours=24),
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        tenant_id: str | None = None,
    ) -> None:
        self._client = client
        self._lifetime = lifetime
        self._clock = clock
        self._tenant_id = tenant_id
        self._held: dict[str, SessionKey] = {}
        self._lock = threading.Lock()

    async def open(self, room_id: str, *, attempt_id: str | None = None) -> SessionKey:
        """A new session key for `room_id` (labelled with it).

        To repeat an open whose answer was lost, pass the same `attempt_id` (from `new_attempt_id()`, kept
        with the pending open): the service then returns the same key, within its retry window. Without
        one, a fresh attempt id is used, so the client's own retries of this call still make one key.

        Raises:
            ValueError: `attempt_id` is not an unguessable token of 22-120 base64url characters.
        """
        attempt = new_attempt_id() if attempt_id is None else attempt_id
        if _ATTEMPT_ID.fullmatch(attempt) is None:
            raise ValueError(
                "attempt_id must be an unguessable token of 22-120 characters of [A-Za-z0-9_-]: "
                "use crypto_client.sessions.new_attempt_id()"
            )
        request_id = f"session:{attempt}"
        session = await self._client.generate_session_key(
            expire_after=self._lifetime,
            labels={"room": room_id[:256]},
            request_id=request_id,
            tenant_id=self._tenant_id,
        )
        self._hold(session)
        return session

    async def fetch(self, key_id: str) -> SessionKey:
        """The session key `key_id`, from memory while it is unexpired, else from the service."""
        with self._lock:
            held = self._held.get(key_id)
        if held is not None and (held.key.expires_at is None or held.key.expires_at > self._clock()):
            return held
        session = await self._client.get_session_key(key_id, tenant_id=self._tenant_id)
        self._hold(session)
        return session

    def forget(self, key_id: str) -> None:
        """Drop the material from memory (e.g. when the call ends)."""
        with self._lock:
            self._held.pop(key_id, None)

    def _hold(self, session: SessionKey) -> None:
        with self._lock:
            self._held[session.key.key_id] = session
