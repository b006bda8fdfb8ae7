"""Composition root: build a running server from its parts."""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from crypto_client.v1 import crypto_service_pb2, key_service_pb2
from crypto_server.backup_key import load_backup_private_key
from crypto_server.config import ConfigError, Settings
from crypto_server.domain.audit_recording import CryptoRecording
from crypto_server.domain.clock import Clock, SystemClock
from crypto_server.domain.errors import InvalidArgument, KeyNotFound
from crypto_server.domain.key_integrity import (
    METADATA_KEY_RECORD,
    MetadataAuthenticator,
    new_metadata_key,
    unwrap_metadata_key,
    wrap_metadata_key,
)
from crypto_server.domain.key_wrap import WrappingKey, make_root_key_check, root_key_matches
from crypto_server.domain.keys import KeyType
from crypto_server.log_format import AccessLogMode
from crypto_server.root_key import RootKey, load_other_root_key, load_root_key
from crypto_server.service.audit import AuditTrail
from crypto_server.service.change_poller import ChangePoller, change_margin
from crypto_server.service.crypto_operations import CryptoOperations
from crypto_server.service.key_backup import KeyBackups
from crypto_server.service.key_destroyer import KeyDestroyer
from crypto_server.service.key_destruction import KeyDestruction
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.key_rotator import KeyRotator
from crypto_server.service.keyring import Keyring
from crypto_server.service.leased_passes import PassSchedule
from crypto_server.service.macs_and_signatures import MacsAndSignatures
from crypto_server.service.quotas import quotas_for
from crypto_server.service.usage_budget import UsageBudget
from crypto_server.storage.audit_sinks import AuditSink, AuditSinkError, FileAuditSink, MongoAuditSink
from crypto_server.storage.circuit import StoreCircuit
from crypto_server.storage.integrity import AuthenticatedKeyStore
from crypto_server.storage.mongo import MongoKeyStore
from crypto_server.storage.port import Invalidation, KeyServing, KeyStore, LocalInvalidation, RootKeyChecks, StoreMeta
from crypto_server.storage.redis.cache import CachedRoles, RedisCachedKeyStore
from crypto_server.storage.redis.guard import RedisGuard, connect
from crypto_server.storage.redis.invalidation import RedisInvalidation
from crypto_server.storage.sqlite import SqliteKeyStore
from crypto_server.transport.authorization import AccessControl, parse_policy
from crypto_server.transport.call_audit import CallAudit
from crypto_server.transport.call_deadline import time_left
from crypto_server.transport.crypto_servicer import CryptoServicer
from crypto_server.transport.health import StoreHealthMonitor
from crypto_server.transport.identity import TokenVerifier, parse_jwks
from crypto_server.transport.key_servicer import KeyServicer
from crypto_server.transport.metrics import Metrics
from crypto_server.transport.middleware import InFlightCalls, RpcLimits, RpcMiddleware, add_service
from crypto_server.transport.streams import StreamSlots
from crypto_server.transport.tls import CertificateError, ServerCertificates
from crypto_server.watched_file import WatchedFile, WatchedFileError

log = logging.getLogger(__name__)

_KEY_SERVICE_DESCRIPTOR = key_service_pb2.DESCRIPTOR.services_by_name["KeyService"]
_CRYPTO_SERVICE_DESCRIPTOR = crypto_service_pb2.DESCRIPTOR.services_by_name["CryptoService"]
KEY_SERVICE = _KEY_SERVICE_DESCRIPTOR.full_name
CRYPTO_SERVICE = _CRYPTO_SERVICE_DESCRIPTOR.full_name
HEALTH_SERVICES = ("", KEY_SERVICE, CRYPTO_SERVICE)
# Before grpc stops: no call (not even a refused one) for this long, waited for at most _MAX_SETTLE_S.
_QUIET_BEFORE_STOP_S = 0.05
_MAX_SETTLE_S = 1.0
# Redis is a cache: a call to it that takes longer than this is not worth waiting for.
_REDIS_TIMEOUT_S = 0.25
# HTTP/2 keepalive (docs/security.md, "Resource limits"): the server pings a connection idle for a minute
# and drops it if the ping goes unanswered for 20 s, so a vanished client's calls end and free their
# workers. Clients may ping every 30 s, even without calls; a client pinging more often gets a strike,
# and after 2 strikes a GOAWAY (too_many_pings).
_KEEPALIVE_OPTIONS = (
    ("grpc.keepalive_time_ms", 60_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 30_000),
    ("grpc.http2.max_ping_strikes", 2),
)


class _Stoppable(Protocol):
    def stop(self) -> None: ...


@dataclass(frozen=True)
class _ClosedRedis:
    """The Redis client as a background task: closed at shutdown, after everything that uses it."""

    client: redis.Redis

    def stop(self) -> None:
        self.client.close()


@dataclass(frozen=True)
class _StoppedServer:
    """A grpc server as a background task (the health port): stopped at once, after the main server."""

    server: grpc.Server

    def stop(self) -> None:
        self.server.stop(0).wait()


@dataclass
class CryptoServer:
    """A started server and what it takes to stop it cleanly."""

    server: grpc.Server
    port: int
    health: health.HealthServicer
    # The database behind the circuit breaker: every role of the store.
    store: KeyStore
    # Key reads and writes as the service makes them: through the Redis cache (if any) and the integrity check.
    serving: KeyServing
    in_flight: InFlightCalls
    keyring: Keyring
    health_monitor: StoreHealthMonitor
    metrics: Metrics | None = None
    metrics_port: int | None = None
    # The plaintext port serving only grpc.health.v1.Health (CRYPTO_HEALTH_PORT); stopped with `background`.
    health_port: int | None = None
    # Threads that serve the requests (cross-replica invalidation): stopped after the last call.
    background: list[_Stoppable] = field(default_factory=list)
    audit: AuditTrail | None = None
    # Automatic rotation (a pass every CRYPTO_ROTATION_INTERVAL by the lease holder); tests call run_once.
    rotator: KeyRotator | None = None
    # Encryption budgets per key version (reserved in blocks); tests call flush, the give-back pass.
    budget: UsageBudget | None = None
    # Scheduled destruction (a pass every CRYPTO_ROTATION_INTERVAL by its lease holder); tests call run_once.
    destroyer: KeyDestroyer | None = None

    def stop(self, grace_s: float, *, drain_s: float = 0.0) -> None:
        """Stop after `drain_s` seconds of serving on, finishing calls in flight within `grace_s` more.

        1. Health turns NOT_SERVING at once, so balancers and health-checking clients stop sending.
        2. For `drain_s` the server serves as usual (a balancer needs a moment to notice).
        3. Then every new call is answered UNAVAILABLE (ERROR_REASON_SHUTTING_DOWN) at once — callers retry,
           reaching another replica — while the calls in flight finish.
        4. Once none is in flight and no call has arrived for a moment, grpc stops. Only calls still running
           when the grace runs out are cancelled.

        Why the wait for a quiet moment: grpc cancels (CANCELLED) calls that have reached the server but not
        yet a handler when it stops; calls answered UNAVAILABLE by step 3 make well-behaved clients back off,
        which gives that moment.
        """
        self.health_monitor.stop()  # it must not turn a service back to SERVING
        self.health.enter_graceful_shutdown()
        if drain_s > 0:
            time.sleep(drain_s)
        deadline = time.monotonic() + grace_s
        self.in_flight.refuse_new_calls()
        while time.monotonic() < deadline and self.in_flight.count:
            time.sleep(0.005)
        settle_until = min(deadline, time.monotonic() + _MAX_SETTLE_S)
        while time.monotonic() < settle_until and self.in_flight.quiet_for() < _QUIET_BEFORE_STOP_S:
            time.sleep(0.005)
        self.server.stop(max(0.0, deadline - time.monotonic())).wait()
        for task in reversed(self.background):  # the root keys, first in, go last
            task.stop()
        if self.metrics is not None:
            self.metrics.stop()
        self.store.close()


def _check_root_key(store: RootKeyChecks, root: RootKey, other: RootKey | None) -> None:
    check = store.get_root_key_check()
    if check is None:
        if store.has_keys():
            # Deleting the check must not let any root key in: it would record itself as the right one.
            raise ConfigError(
                "the key store holds keys but no root key check value (the store was altered or damaged); "
                "refusing to start"
            )
        check = store.set_root_key_check(make_root_key_check(root))
    if root_key_matches(root, check):
        return
    if other is not None and root_key_matches(other, check):
        log.warning(
            "root key rotation in progress: run crypto-rewrap-root, then drop CRYPTO_OTHER_ROOT_KEY_FILE "
            "(or CRYPTO_PKCS11_OTHER_KEY_LABEL)"
        )
        return
    raise ConfigError(
        "the configured root key is not the one that wrapped the keys in this store "
        f"({root.source}, fingerprint {root.fingerprint}); refusing to start (check CRYPTO_ROOT_KEY / "
        "CRYPTO_ROOT_KEY_FILE, or the CRYPTO_PKCS11_* settings)"
    )


def load_metadata_authenticator(store: StoreMeta, roots: tuple[WrappingKey, ...]) -> MetadataAuthenticator:
    """The authenticator of key metadata, its key created (wrapped under the root key) on a new store."""
    wrapped = store.get_meta(METADATA_KEY_RECORD)
    if wrapped is None:
        if store.has_keys():
            raise ConfigError(
                "the key store holds keys but no metadata key, so their metadata cannot be authenticated "
                "(the store was altered, or was written by a version before metadata authentication); "
                "refusing to start"
            )
        wrapped = store.add_meta(METADATA_KEY_RECORD, wrap_metadata_key(roots[0], new_metadata_key()))
    metadata_key = unwrap_metadata_key(roots, wrapped)
    if metadata_key is None:
        raise ConfigError("the key store's metadata key does not open under the root key (the store was altered)")
    return MetadataAuthenticator(metadata_key)


def build_access_control(settings: Settings, keyring: Keyring) -> AccessControl | None:
    """Caller identification (mTLS, bearer tokens) and the access policy, as configured; None in development."""
    if settings.tls_client_ca_file is None and settings.jwks_file is None and settings.policy_file is None:
        return None
    try:
        tokens = None
        if settings.jwks_file is not None and settings.jwt_issuer and settings.jwt_audience:
            jwks = WatchedFile(
                settings.jwks_file,
                parse_jwks,
                what="JWKS (CRYPTO_JWKS_FILE)",
                check_interval_s=settings.reload_interval_s,
            )
            tokens = TokenVerifier(jwks, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
        policy = None
        if settings.policy_file is not None:
            policy = WatchedFile(
                settings.policy_file,
                parse_policy,
                what="access policy (CRYPTO_POLICY_FILE)",
                check_interval_s=settings.reload_interval_s,
            )
    except WatchedFileError as error:
        raise ConfigError(str(error)) from None
    if policy is None:
        log.warning("no access policy (CRYPTO_POLICY_FILE): callers are identified but not restricted")

    def key_labels(tenant_id: str, key_id: str) -> dict[str, str] | None:
        try:
            key = keyring.lookup(tenant_id, key_id).key
        except (KeyNotFound, InvalidArgument):
            return None
        return None if key.key_type is KeyType.MASTER else dict(key.labels)

    return AccessControl(tokens=tokens, policy=policy, key_labels=key_labels)


def _listen(server: grpc.Server, settings: Settings) -> int:
    """Bind the main port: TLS (certificates re-read on change) when configured, else plaintext."""
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert_file is not None and settings.tls_key_file is not None:
            try:
                certificates = ServerCertificates(
                    settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file
                )
            except CertificateError as error:
                raise ConfigError(f"CRYPTO_TLS_*: {error}") from None
            return server.add_secure_port(address, certificates.credentials())
        return server.add_insecure_port(address)
    except RuntimeError as error:
        raise ConfigError(f"cannot listen on {address}: {error}") from None


def serve_health(settings: Settings, servicer: health.HealthServicer) -> tuple[grpc.Server, int]:
    """A plaintext server with nothing but the health service (the same servicer, so the same answers)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="health"))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    address = f"{settings.host}:{settings.health_port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as error:
        raise ConfigError(f"cannot listen on {address} (CRYPTO_HEALTH_PORT): {error}") from None
    server.start()
    return server, port


def _open_store(settings: Settings) -> tuple[KeyStore, str]:
    """The configured key store and a name for it that keeps shared caches apart."""
    if settings.mongodb_uri:
        store = MongoKeyStore(
            settings.mongodb_uri, settings.mongodb_database, timeout_s=settings.store_timeout_s, time_left=time_left
        )
        return store, f"mongo:{settings.mongodb_database}"
    # Two embedded stores sharing one Redis must not share cache entries: name the store by its file.
    location = hashlib.sha256(str(settings.data_dir.resolve()).encode()).hexdigest()[:12]
    return SqliteKeyStore(settings.data_dir), f"embedded:{location}"


@dataclass(frozen=True)
class _RedisCache:
    """The Redis client, its back-off guard, and the key records behind the cache: the server also subscribes
    to invalidations with the first two."""

    client: redis.Redis
    guard: RedisGuard
    store: RedisCachedKeyStore


def _redis_cache(
    settings: Settings, store: CachedRoles, namespace: str, on_failure: Callable[[], None] | None = None
) -> _RedisCache | None:
    """`store`'s key records behind the Redis cache when REDIS_URL is set; None without Redis."""
    if not settings.redis_url:
        return None
    client = connect(settings.redis_url, timeout_s=_REDIS_TIMEOUT_S)
    guard = RedisGuard(on_failure=on_failure)
    cached = RedisCachedKeyStore(store, client, namespace, ttl_s=settings.cache_ttl_s, guard=guard)
    return _RedisCache(client, guard, cached)


@dataclass
class OpenedStore:
    """The configured store as a tool that writes keys opens it (crypto-rewrap-root)."""

    # Every role, straight to the database.
    database: KeyStore
    # The roles that write key records, through the Redis cache when REDIS_URL is set, so that no replica
    # reads an outdated key from it.
    key_records: CachedRoles
    _redis: redis.Redis | None = None

    def close(self) -> None:
        self.database.close()
        if self._redis is not None:
            self._redis.close()


def open_key_store(settings: Settings) -> OpenedStore:
    """The configured store, its key records behind the Redis cache when REDIS_URL is set (for tools)."""
    store, namespace = _open_store(settings)
    cache = _redis_cache(settings, store, namespace)
    return OpenedStore(store, store) if cache is None else OpenedStore(store, cache.store, cache.client)


def open_audit_sink(settings: Settings) -> AuditSink:
    """The audit sink that goes with the configured store: its MongoDB database, or a file."""
    if settings.mongodb_uri:
        return MongoAuditSink(
            settings.mongodb_uri, settings.mongodb_database, timeout_s=settings.store_timeout_s, time_left=time_left
        )
    return FileAuditSink(settings.audit_path)


def _start_audit_trail(
    settings: Settings, authenticator: MetadataAuthenticator, clock: Clock, metrics: Metrics | None
) -> AuditTrail:
    """The audit trail, its chain opened: a server that cannot audit does not start."""
    try:
        trail = AuditTrail(
            open_audit_sink(settings),
            authenticator.audit_chain_key(),
            clock,
            crypto=CryptoRecording.parse(settings.audit_crypto),
            checkpoint_every=settings.audit_checkpoint_records,
            checkpoint_interval_s=settings.audit_checkpoint_interval_s,
            buffer_records=settings.audit_buffer_records,
            on_drop=metrics.audit_dropped.inc if metrics else None,
        )
        trail.start()
    except AuditSinkError as error:
        raise ConfigError(f"the audit trail cannot be written ({error}); refusing to start") from None
    return trail


def build_server(
    settings: Settings,
    *,
    clock: Clock | None = None,
    interceptors: Sequence[grpc.ServerInterceptor] = (),
    register: Sequence[Callable[[grpc.Server], None]] = (),
) -> CryptoServer:
    """Open the store, wire the services and start serving on settings.host:settings.port (0 = any free port).

    `interceptors` (grpc.ServerInterceptor) run before the service's own middleware (request id,
    errors, logging), first one outermost;
    `register` adds further services before the server starts.
    """
    clock = clock or SystemClock()
    backup_private_key = load_backup_private_key(settings)
    root = load_root_key(settings)
    other_root = load_other_root_key(settings)
    raw_store, namespace = _open_store(settings)
    # Fail fast while the database is down, and never let it hold more than its share of the workers.
    store: KeyStore = StoreCircuit(raw_store, max_concurrent=settings.store_call_limit)
    # Root keys let go of their HSM sessions last, after the last call.
    background: list[_Stoppable] = [root] if other_root is None else [root, other_root]
    in_flight = InFlightCalls()
    metrics = Metrics(lambda: in_flight.count) if settings.metrics_port is not None else None
    try:
        _check_root_key(store, root, other_root)
        authenticator = load_metadata_authenticator(store, (root, other_root) if other_root else (root,))
        # Key reads and writes go through the Redis cache (if any) and the integrity check; every other role
        # of the store (schedule, leases, change feed, health, statistics) straight to the circuit.
        cache = _redis_cache(settings, store, namespace, on_failure=metrics.redis_errors.inc if metrics else None)
        if cache is not None:
            background.append(_ClosedRedis(cache.client))  # after the invalidation thread that shares it
        serving: KeyServing = AuthenticatedKeyStore(
            store if cache is None else cache.store,
            authenticator,
            on_failure=metrics.integrity_failures.inc if metrics else None,
        )
        # The same records read from the database itself, still checked: for decisions that must not rest on a
        # cached copy, which may trail the store (what destruction erases, what a backup keeps).
        fresh: KeyServing = (
            serving
            if cache is None
            else AuthenticatedKeyStore(
                store, authenticator, on_failure=metrics.integrity_failures.inc if metrics else None
            )
        )
        keyring = Keyring(
            serving,
            root,
            ttl_s=settings.keyring_ttl_s,
            max_keys=settings.keyring_size,
            max_stale_s=settings.keyring_max_stale_s,
            other_roots=(other_root,) if other_root else (),
            fresh=fresh,
        )
        invalidation: Invalidation
        if cache is not None:
            invalidation = RedisInvalidation(cache.client, namespace, keyring, guard=cache.guard)
            background.append(invalidation)
        else:
            invalidation = LocalInvalidation(keyring)
        # The bound that holds whatever Redis does: every server reads recent changes from the store.
        poller = ChangePoller(
            store,
            keyring,
            interval_s=settings.invalidation_interval_s,
            margin_s=change_margin(settings.store_timeout_s).total_seconds(),
            cache_fixes=[cache.store.drop_if_older] if cache is not None else [],
            served_copies=[cache.store.take_served_copies] if cache is not None else [],
        )
        poller.start()
        background.append(poller)
        audit = _start_audit_trail(settings, authenticator, clock, metrics)
        background.append(audit)
        lifecycle = KeyLifecycle(
            serving,
            keyring,
            clock,
            invalidation,
            schedule=store,
            fresh=fresh,
            request_key_id_secret=authenticator.request_key_id_secret(),
            max_session_lifetime=timedelta(seconds=settings.max_session_key_lifetime_s),
        )
        # The destroyer runs on the rotator's interval and lease length, under a lease of its own.
        passes = PassSchedule(interval_s=settings.rotation_interval_s, lease_ttl_s=settings.rotation_lease_s)
        rotator = KeyRotator(store, lifecycle, clock, passes, audit=audit, usage_soft_limit=settings.usage_soft_limit)
        destruction = KeyDestruction(serving, clock, invalidation, fresh=fresh, listing=store)
        destroyer = KeyDestroyer(store, destruction, clock, passes, audit=audit)
        budget = UsageBudget(
            store if cache is None else cache.store,  # a soft-limit mark drops the cached copy
            clock,
            soft_limit=settings.usage_soft_limit,
            hard_limit=settings.usage_hard_limit,
            flush_every=settings.usage_flush_every,
            flush_interval_s=settings.usage_flush_interval_s,
            on_fraction=metrics.key_version_budget_used.set if metrics else None,
        )
        operations = CryptoOperations(
            keyring,
            clock,
            max_plaintext_bytes=settings.max_plaintext_bytes,
            max_batch_items=settings.max_batch_items,
            max_batch_bytes=settings.max_batch_bytes,
            budget=budget,
        )

        message_limit = settings.message_limit_bytes
        limits = RpcLimits(
            streams=StreamSlots(settings.stream_limit),
            stream_idle_timeout_s=settings.stream_idle_timeout_s,
            quotas=quotas_for(settings.tenant_rate, settings.tenant_burst),
            max_response_bytes=message_limit,
        )
        middleware = RpcMiddleware(
            in_flight,
            observer=metrics,
            limits=limits,
            access=build_access_control(settings, keyring),
            audit=CallAudit(audit),
            access_log_mode=AccessLogMode.parse(settings.access_log),
        )
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="rpc"),
            interceptors=list(interceptors),
            options=[
                ("grpc.max_receive_message_length", message_limit),
                ("grpc.max_send_message_length", message_limit),
                # Two servers must not silently share one port, unless asked to (multi-process mode).
                ("grpc.so_reuseport", 1 if settings.reuse_port else 0),
                # A client must reconnect now and then (a GOAWAY, then `grace` for its calls to finish):
                # load spreads over new replicas, and nothing holds a connection forever.
                ("grpc.max_connection_age_ms", round(settings.max_connection_age_s * 1000)),
                ("grpc.max_connection_age_grace_ms", round(settings.max_connection_age_grace_s * 1000)),
                *_KEEPALIVE_OPTIONS,
            ],
            # Calls beyond this are refused by grpc at once (RESOURCE_EXHAUSTED), not queued for a worker.
            maximum_concurrent_rpcs=settings.concurrent_rpc_limit,
        )
        backups = KeyBackups(
            fresh,
            store,
            keyring,
            lifecycle,
            clock,
            root_fingerprint=bytes.fromhex(root.fingerprint),
            other_roots=((bytes.fromhex(other_root.fingerprint), other_root),) if other_root else (),
            backup_private_key=backup_private_key,
        )
        add_service(
            server,
            _KEY_SERVICE_DESCRIPTOR,
            KeyServicer(lifecycle, clock, audit, backups, destruction),
            middleware,
        )
        signatures = MacsAndSignatures(keyring, clock, max_data_bytes=settings.max_plaintext_bytes)
        add_service(server, _CRYPTO_SERVICE_DESCRIPTOR, CryptoServicer(operations, signatures), middleware)
        health_servicer = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        for add_extra_service in register:
            add_extra_service(server)
        if settings.reflection_enabled:
            reflection.enable_server_reflection(
                (KEY_SERVICE, CRYPTO_SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server
            )
        port = _listen(server, settings)
        server.start()
        health_port = None
        if settings.health_port is not None:
            health_server, health_port = serve_health(settings, health_servicer)
            background.append(_StoppedServer(health_server))
        metrics_port = None
        if metrics is not None and settings.metrics_port is not None:
            metrics.watch_state(keyring, store, clock)
            metrics.watch_root_keys(root, other_root)
            metrics_port = metrics.serve(settings.host, settings.metrics_port)
        # Stopped before the audit trail and the store (background stops last in, first): it gives its lease up.
        rotator.start()
        background.append(rotator)
        destroyer.start()
        background.append(destroyer)
        # Stopped first (after the last call): its final flush needs the store.
        budget.start()
        background.append(budget)
    except BaseException:
        for task in background:
            task.stop()
        store.close()
        raise
    for name in HEALTH_SERVICES:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    monitor = StoreHealthMonitor(
        store, health_servicer, KEY_SERVICE, interval_s=settings.health_interval_s, root_key=root
    )
    monitor.check_once()
    monitor.start()
    return CryptoServer(
        server=server,
        port=port,
        health=health_servicer,
        store=store,
        serving=serving,
        in_flight=middleware.in_flight,
        keyring=keyring,
        health_monitor=monitor,
        metrics=metrics,
        metrics_port=metrics_port,
        health_port=health_port,
        background=background,
        audit=audit,
        rotator=rotator,
        budget=budget,
        destroyer=destroyer,
    )
