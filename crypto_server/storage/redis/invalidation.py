"""Invalidation across servers over Redis pub/sub."""

from __future__ import annotations

import contextlib
import json
import logging
import threading

import redis
from redis.exceptions import RedisError

from crypto_server.storage.port import InvalidationListener
from crypto_server.storage.redis.guard import RedisGuard

log = logging.getLogger(__name__)


class RedisInvalidation:
    """Invalidation across servers over Redis pub/sub.

    The local listener is told at once (a change takes effect immediately on
    the server that made it); every other server hears it on the channel.
    While the channel is down messages may be missed, so on reconnecting the
    listener drops everything and reloads.
    """

    def __init__(
        self, client: redis.Redis, namespace: str, listener: InvalidationListener, *, guard: RedisGuard
    ) -> None:
        self._client = client
        self._channel = f"caas:crypto:{namespace}:invalidate"
        self._listener = listener
        self._guard = guard
        self._stopping = threading.Event()
        self._subscribed = threading.Event()
        self._thread = threading.Thread(target=self._listen, name="redis-invalidation", daemon=True)
        self._thread.start()

    def key_changed(self, tenant_id: str, key_id: str) -> None:
        self._listener.forget(tenant_id, key_id)
        self._publish({"tenant_id": tenant_id, "key_id": key_id})

    def tenant_changed(self, tenant_id: str) -> None:
        self._listener.forget_tenant(tenant_id)
        self._publish({"tenant_id": tenant_id, "key_id": None})

    def _publish(self, message: dict[str, str | None]) -> None:
        # Not through the guard's back-off: a lost invalidation costs more than a slow write.
        try:
            self._client.publish(self._channel, json.dumps(message))
        except RedisError as error:
            self._guard.failed("publish", error)

    def wait_subscribed(self, timeout_s: float) -> bool:
        return self._subscribed.wait(timeout_s)

    def _deliver(self, raw: bytes) -> None:
        try:
            message = json.loads(raw)
            tenant_id = message["tenant_id"]
            key_id = message["key_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed invalidation message")
            return
        if key_id is None:
            self._listener.forget_tenant(tenant_id)
        else:
            self._listener.forget(tenant_id, key_id)

    def _listen(self) -> None:
        missed_messages = False
        while not self._stopping.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
            try:
                pubsub.subscribe(self._channel)
                if missed_messages:
                    self._listener.forget_all()
                    missed_messages = False
                self._subscribed.set()
                self._guard.succeeded()
                while not self._stopping.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message is not None and message.get("type") == "message":
                        self._deliver(message["data"])
            except RedisError as error:
                self._subscribed.clear()
                missed_messages = True
                self._guard.failed("subscribe", error)
                self._stopping.wait(0.5)
            finally:
                with contextlib.suppress(RedisError):
                    pubsub.close()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)
