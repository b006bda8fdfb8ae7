"""Settings from environment variables, validated once at start-up."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from crypto_server.domain.audit_recording import CryptoRecording
from crypto_server.domain.limits import GCM_RANDOM_NONCE_LIMIT, MAX_AAD_BYTES

# Larger single messages belong in streaming or envelope encryption, not one unary call.
MAX_PLAINTEXT_LIMIT_BYTES = 64 * 1024 * 1024
# The smallest receive/send message limit; room for batches of small items.
MIN_MESSAGE_BYTES = 16 * 1024 * 1024
# A generous bound on what one item adds to a batch response beyond its request bytes: ciphertext
# overhead (codec.OVERHEAD_BYTES), key id, version and framing, or an ItemError with its message.
BATCH_ITEM_RESPONSE_BYTES = 1024
# Encryptions per version one server reserves at once (CRYPTO_KEY_USAGE_FLUSH_EVERY).
_USAGE_FLUSH_EVERY = 4096


_Number = TypeVar("_Number", int, float)


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 3009
    workers: int = 16
    data_dir: Path = Path("data")
    # Secrets stay out of repr(), so logging the settings cannot leak them.
    root_key: str | None = field(default=None, repr=False)
    root_key_file: Path | None = None
    # Another root key accepted for unwrapping (never for wrapping), during a root key rotation.
    other_root_key_file: Path | None = None
    # Accept a root key file that other users can read (CRYPTO_ALLOW_INSECURE): an escape hatch, never a default.
    allow_insecure: bool = False
    # The private key (PEM, RSA 3072 or X25519) that opens key backups exported for its public key (ImportKey).
    backup_private_key_file: Path | None = None
    max_plaintext_bytes: int = 1024 * 1024
    keyring_ttl_s: float = 300.0
    keyring_size: int = 10_000
    keyring_max_stale_s: float = 3600.0
    shutdown_grace_s: float = 10.0
    log_level: str = "INFO"
    mongodb_uri: str | None = field(default=None, repr=False)
    mongodb_database: str = "caas_crypto"
    store_timeout_s: float = 5.0
    redis_url: str | None = field(default=None, repr=False)
    cache_ttl_s: float = 3600.0
    health_interval_s: float = 2.0
    # How often each server asks the store which keys changed (the bound on missing another server's change).
    invalidation_interval_s: float = 1.0
    # Automatic rotation: a pass every interval (0: this replica never rotates), by the lease holder only.
    rotation_interval_s: float = 60.0
    rotation_lease_s: float = 180.0
    # The usage budget of a key version (service/usage_budget.py): rotate at the soft limit, refuse at the hard one.
    usage_soft_limit: int = 2**30
    # NIST SP 800-38D's bound itself: reservations make it exact across replicas and crashes, no margin needed.
    usage_hard_limit: int = GCM_RANDOM_NONCE_LIMIT
    usage_flush_every: int = _USAGE_FLUSH_EVERY
    usage_flush_interval_s: float = 5.0
    reuse_port: bool = False
    # Server processes sharing the port under one supervisor (crypto_server/supervisor.py); 1: this process serves.
    processes: int = 1
    metrics_port: int | None = None
    max_batch_items: int = 1000
    max_session_key_lifetime_s: float = 7 * 86400.0
    # Request bytes (plaintexts or ciphertexts, and aads) in one batch. With the per-item overhead of the
    # response (BATCH_ITEM_RESPONSE_BYTES) the answer to the largest batch fits in one 16 MiB message.
    max_batch_bytes: int = 8 * 1024 * 1024
    # None: a quarter of the workers (see resolved values below).
    max_streams: int | None = None
    stream_idle_timeout_s: float = 30.0
    # None: eight calls per worker; grpc refuses any beyond with RESOURCE_EXHAUSTED.
    max_concurrent_rpcs: int | None = None
    max_connection_age_s: float = 1800.0
    max_connection_age_grace_s: float = 300.0
    # Requests per second per tenant (batch items count one each); 0 turns quotas off.
    tenant_rate: float = 10_000.0
    tenant_burst: int = 20_000
    # None: half the workers may wait on the key store at once; the rest stay free for cached keys and health.
    store_concurrency: int | None = None
    # After SIGTERM: seconds of serving on with health NOT_SERVING, so balancers stop sending first.
    shutdown_drain_s: float = 0.0
    # Transport security and access control (docs/security.md, "Identity and access").
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Client certificates required and verified against this CA (mTLS).
    tls_client_ca_file: Path | None = None
    # A plaintext port serving only grpc.health.v1.Health (probes when the main port requires mTLS).
    health_port: int | None = None
    jwks_file: Path | None = None
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    # With a policy, every call needs an identity and a grant; without one, callers are only identified.
    policy_file: Path | None = None
    # None: on in development (loopback, no TLS), off otherwise.
    reflection: bool | None = None
    # How often the policy and JWKS files are checked for a new version.
    reload_interval_s: float = 1.0

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def loopback_only(self) -> bool:
        return is_loopback(self.host)

    @property
    def reflection_enabled(self) -> bool:
        if self.reflection is not None:
            return self.reflection
        return self.loopback_only and not self.tls

    # The audit trail (docs/security.md, "Audit trail"). None: <data dir>/audit.jsonl (embedded store only).
    audit_file: Path | None = None
    audit_crypto: str = "denied_only"
    audit_checkpoint_records: int = 1000
    audit_checkpoint_interval_s: float = 60.0
    audit_buffer_records: int = 10_000

    @property
    def audit_path(self) -> Path:
        return self.audit_file or self.data_dir / "audit.jsonl"

    @property
    def store_call_limit(self) -> int:
        return self.store_concurrency if self.store_concurrency is not None else max(1, self.workers // 2)

    # Where the root key lives (CRYPTO_ROOT_KEY_PROVIDER): "file" (the variable, file or development key above)
    # or "pkcs11", a key object in a PKCS#11 token that never leaves it (docs/operations.md, "The root key in an
    # HSM"). The PIN is read from a file, never from a variable.
    root_key_provider: str = "file"
    pkcs11_library: Path | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin_file: Path | None = None
    pkcs11_key_label: str | None = None
    # Another root key in the same token, accepted for unwrapping only (as CRYPTO_OTHER_ROOT_KEY_FILE).
    pkcs11_other_key_label: str | None = None

    @property
    def has_root_key(self) -> bool:
        """Whether the root key is configured (not a development key generated into the data directory)."""
        return bool(self.root_key or self.root_key_file or self.root_key_provider == "pkcs11")

    @property
    def has_other_root_key(self) -> bool:
        return self.other_root_key_file is not None or self.pkcs11_other_key_label is not None

    @property
    def stream_limit(self) -> int:
        # A quarter of the workers: the other three quarters always serve unary calls and health.
        return self.max_streams if self.max_streams is not None else max(1, self.workers // 4)

    @property
    def concurrent_rpc_limit(self) -> int:
        return self.max_concurrent_rpcs if self.max_concurrent_rpcs is not None else self.workers * 8

    @property
    def message_limit_bytes(self) -> int:
        """grpc's receive and send limit: room for the largest legal request, so an oversized plaintext
        reaches the handler and gets INVALID_ARGUMENT naming the field rather than a transport error."""
        return max(MIN_MESSAGE_BYTES, self.max_plaintext_bytes + MAX_AAD_BYTES + 64 * 1024)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Settings from `env`, by default the process environment.

        Reading the process environment also removes CRYPTO_ROOT_KEY from it, so that no child process
        inherits the root key. That does not clear /proc/<pid>/environ (Linux keeps the environment the
        process started with); only CRYPTO_ROOT_KEY_FILE keeps the key out of it.
        """
        if env is None:
            env = dict(os.environ)
            os.environ.pop("CRYPTO_ROOT_KEY", None)
        defaults = cls()

        def text(name: str, default: str) -> str:
            return env.get(name, "").strip() or default

        def in_range(name: str, default: _Number, low: _Number, high: _Number, parse: type[_Number]) -> _Number:
            raw = text(name, "")
            if not raw:
                return default
            try:
                value = parse(raw)
            except ValueError:
                kind = "an integer" if parse is int else "a number of seconds"
                raise ConfigError(f"{name} must be {kind}, got {raw!r}") from None
            if not low <= value <= high:
                raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
            return value

        def integer(name: str, default: int, low: int, high: int) -> int:
            return in_range(name, default, low, high, int)

        def number(name: str, default: float, low: float, high: float) -> float:
            return in_range(name, default, low, high, float)

        def flag(name: str) -> bool:
            raw = env.get(name, "").strip().lower()
            if raw in {"", "0", "false", "no"}:
                return False
            if raw in {"1", "true", "yes"}:
                return True
            raise ConfigError(f"{name} must be 1/true/yes or 0/false/no, got {raw!r}")

        root_key = env.get("CRYPTO_ROOT_KEY", "").strip() or None
        root_key_file = env.get("CRYPTO_ROOT_KEY_FILE", "").strip() or None
        if root_key and root_key_file:
            raise ConfigError("set CRYPTO_ROOT_KEY or CRYPTO_ROOT_KEY_FILE, not both")
        mongodb_uri = env.get("MONGODB_URI", "").strip() or None
        other_root_key_file = env.get("CRYPTO_OTHER_ROOT_KEY_FILE", "").strip() or None
        hsm = _pkcs11_settings(env, root_key=root_key, root_key_file=root_key_file, other_file=other_root_key_file)
        has_root_key = bool(root_key or root_key_file or hsm["root_key_provider"] == "pkcs11")
        if other_root_key_file and not has_root_key:
            raise ConfigError("CRYPTO_OTHER_ROOT_KEY_FILE needs the root key set too (CRYPTO_ROOT_KEY_FILE)")
        if hsm["pkcs11_other_key_label"] and not has_root_key:
            raise ConfigError("CRYPTO_PKCS11_OTHER_KEY_LABEL needs the root key set too (CRYPTO_ROOT_KEY_FILE)")
        if mongodb_uri and not has_root_key:
            # Every replica must share one root key; a generated one would differ per replica.
            raise ConfigError(
                "MONGODB_URI needs the root key: set CRYPTO_ROOT_KEY_FILE (or CRYPTO_ROOT_KEY, "
                "or CRYPTO_ROOT_KEY_PROVIDER=pkcs11)"
            )
        mongodb_database = text("MONGODB_DATABASE", defaults.mongodb_database)
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,63}", mongodb_database):
            raise ConfigError("MONGODB_DATABASE must be 1-63 characters of letters, digits, '_' or '-'")
        redis_url = env.get("REDIS_URL", "").strip() or None
        if redis_url and not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://")
        # Processes sharing the port need no Redis: each learns the others' key changes from the store itself
        # within CRYPTO_INVALIDATION_INTERVAL (service/change_poller.py), as replicas do.
        processes = _processes(env.get("CRYPTO_PROCESSES", ""))
        log_level = text("CRYPTO_LOG_LEVEL", "INFO").upper()
        if log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"CRYPTO_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {log_level!r}")
        workers = integer("CRYPTO_WORKERS", defaults.workers, 1, 1024)
        max_batch_items = integer("CRYPTO_MAX_BATCH_ITEMS", defaults.max_batch_items, 1, 100_000)
        max_batch_bytes = integer("CRYPTO_MAX_BATCH_BYTES", defaults.max_batch_bytes, 1, MIN_MESSAGE_BYTES)
        if max_batch_bytes + max_batch_items * BATCH_ITEM_RESPONSE_BYTES > MIN_MESSAGE_BYTES:
            # The answer to the largest batch must fit in one message.
            raise ConfigError(
                f"CRYPTO_MAX_BATCH_BYTES + CRYPTO_MAX_BATCH_ITEMS x {BATCH_ITEM_RESPONSE_BYTES} must be at most "
                f"{MIN_MESSAGE_BYTES} (the message limit), got {max_batch_bytes} + {max_batch_items} items"
            )
        max_streams = None
        if env.get("CRYPTO_MAX_STREAMS", "").strip():
            # Streams hold a worker each: at least one worker must stay free for unary calls and health.
            max_streams = integer("CRYPTO_MAX_STREAMS", 1, 1, max(1, workers - 1))
        store_concurrency = None
        if env.get("CRYPTO_STORE_CONCURRENCY", "").strip():
            # At least one worker must stay out of the store, for cached keys and health.
            store_concurrency = integer("CRYPTO_STORE_CONCURRENCY", 1, 1, max(1, workers - 1))
        max_concurrent_rpcs = None
        if env.get("CRYPTO_MAX_CONCURRENT_RPCS", "").strip():
            max_concurrent_rpcs = integer("CRYPTO_MAX_CONCURRENT_RPCS", 1, workers, 1_000_000)
        rotation_interval_s, rotation_lease_s = _rotation_settings(number, defaults)
        usage_hard_limit = integer("CRYPTO_KEY_USAGE_HARD_LIMIT", defaults.usage_hard_limit, 1, GCM_RANDOM_NONCE_LIMIT)
        usage_soft_limit = integer("CRYPTO_KEY_USAGE_SOFT_LIMIT", defaults.usage_soft_limit, 1, GCM_RANDOM_NONCE_LIMIT)
        if usage_soft_limit > usage_hard_limit:
            raise ConfigError(
                f"CRYPTO_KEY_USAGE_SOFT_LIMIT ({usage_soft_limit}) must be at most CRYPTO_KEY_USAGE_HARD_LIMIT "
                f"({usage_hard_limit}): the key must rotate before its primary refuses to encrypt"
            )
        tenant_rate = number("CRYPTO_TENANT_RATE", defaults.tenant_rate, 0, 1e9)
        tenant_burst = integer("CRYPTO_TENANT_BURST", defaults.tenant_burst, 1, 1_000_000_000)
        if tenant_rate and tenant_burst < max_batch_items:
            raise ConfigError(
                f"CRYPTO_TENANT_BURST ({tenant_burst}) must be at least CRYPTO_MAX_BATCH_ITEMS ({max_batch_items}): "
                "a batch costs one token per item and could never pass"
            )
        security = _security_settings(env, flag, number)
        host = text("CRYPTO_HOST", defaults.host)
        protected = security["tls_cert_file"] and security["policy_file"]
        if not is_loopback(host) and not protected and not flag("CRYPTO_ALLOW_INSECURE"):
            raise ConfigError(
                f"CRYPTO_HOST={host} is reachable from other machines, but the server lacks TLS "
                "(CRYPTO_TLS_CERT_FILE, CRYPTO_TLS_KEY_FILE) or an access policy (CRYPTO_POLICY_FILE): any "
                "process that reaches the port could act as any tenant. Configure both, bind 127.0.0.1, or "
                "set CRYPTO_ALLOW_INSECURE=1 if something in front (a mesh sidecar) does both"
            )
        health_port = None
        if env.get("CRYPTO_HEALTH_PORT", "").strip():
            health_port = integer("CRYPTO_HEALTH_PORT", 0, 0, 65535)
        metrics_port = None
        if env.get("CRYPTO_METRICS_PORT", "").strip():
            # With several processes, process i serves /metrics on CRYPTO_METRICS_PORT + i.
            metrics_port = integer("CRYPTO_METRICS_PORT", 0, 0, 65536 - processes)
        audit_crypto = text("CRYPTO_AUDIT_CRYPTO", defaults.audit_crypto)
        try:
            audit_crypto = str(CryptoRecording.parse(audit_crypto))
        except ValueError as error:
            raise ConfigError(f"CRYPTO_AUDIT_CRYPTO {error}") from None
        audit_file = env.get("CRYPTO_AUDIT_FILE", "").strip()
        return cls(
            host=host,
            health_port=health_port,
            **security,
            port=integer("CRYPTO_PORT", defaults.port, 0, 65535),
            workers=workers,
            data_dir=Path(text("CRYPTO_DATA_DIR", str(defaults.data_dir))),
            root_key=root_key,
            root_key_file=Path(root_key_file) if root_key_file else None,
            other_root_key_file=Path(other_root_key_file) if other_root_key_file else None,
            allow_insecure=flag("CRYPTO_ALLOW_INSECURE"),
            backup_private_key_file=_optional_path(env, "CRYPTO_BACKUP_PRIVATE_KEY_FILE"),
            max_plaintext_bytes=integer(
                "CRYPTO_MAX_PLAINTEXT_BYTES", defaults.max_plaintext_bytes, 1, MAX_PLAINTEXT_LIMIT_BYTES
            ),
            keyring_ttl_s=number("CRYPTO_KEYRING_TTL", defaults.keyring_ttl_s, 0, 86400),
            keyring_size=integer("CRYPTO_KEYRING_SIZE", defaults.keyring_size, 1, 10_000_000),
            keyring_max_stale_s=number("CRYPTO_KEYRING_MAX_STALE", defaults.keyring_max_stale_s, 0, 7 * 86400),
            shutdown_grace_s=number("CRYPTO_SHUTDOWN_GRACE", defaults.shutdown_grace_s, 0, 3600),
            log_level=log_level,
            mongodb_uri=mongodb_uri,
            mongodb_database=mongodb_database,
            store_timeout_s=number("CRYPTO_STORE_TIMEOUT", defaults.store_timeout_s, 0.1, 120),
            redis_url=redis_url,
            cache_ttl_s=number("CRYPTO_CACHE_TTL", defaults.cache_ttl_s, 1, 7 * 86400),
            reuse_port=flag("CRYPTO_REUSE_PORT"),
            processes=processes,
            metrics_port=metrics_port,
            max_batch_items=max_batch_items,
            max_batch_bytes=max_batch_bytes,
            max_streams=max_streams,
            store_concurrency=store_concurrency,
            shutdown_drain_s=number("CRYPTO_SHUTDOWN_DRAIN", defaults.shutdown_drain_s, 0, 600),
            stream_idle_timeout_s=number("CRYPTO_STREAM_IDLE_TIMEOUT", defaults.stream_idle_timeout_s, 0.01, 3600),
            max_concurrent_rpcs=max_concurrent_rpcs,
            max_connection_age_s=number("CRYPTO_MAX_CONNECTION_AGE", defaults.max_connection_age_s, 1, 30 * 86400),
            max_connection_age_grace_s=number(
                "CRYPTO_MAX_CONNECTION_AGE_GRACE", defaults.max_connection_age_grace_s, 0, 86400
            ),
            tenant_rate=tenant_rate,
            tenant_burst=tenant_burst,
            max_session_key_lifetime_s=number(
                "CRYPTO_MAX_SESSION_KEY_LIFETIME", defaults.max_session_key_lifetime_s, 60, 365 * 86400
            ),
            health_interval_s=number("CRYPTO_HEALTH_INTERVAL", defaults.health_interval_s, 0.1, 60),
            invalidation_interval_s=number("CRYPTO_INVALIDATION_INTERVAL", defaults.invalidation_interval_s, 0.05, 60),
            rotation_interval_s=rotation_interval_s,
            rotation_lease_s=rotation_lease_s,
            usage_soft_limit=usage_soft_limit,
            usage_hard_limit=usage_hard_limit,
            usage_flush_every=integer("CRYPTO_KEY_USAGE_FLUSH_EVERY", defaults.usage_flush_every, 1, 1_000_000),
            usage_flush_interval_s=number(
                "CRYPTO_KEY_USAGE_FLUSH_INTERVAL", defaults.usage_flush_interval_s, 0.1, 3600
            ),
            audit_file=Path(audit_file) if audit_file else None,
            audit_crypto=audit_crypto,
            audit_checkpoint_records=integer(
                "CRYPTO_AUDIT_CHECKPOINT_RECORDS", defaults.audit_checkpoint_records, 1, 1_000_000
            ),
            audit_checkpoint_interval_s=number(
                "CRYPTO_AUDIT_CHECKPOINT_INTERVAL", defaults.audit_checkpoint_interval_s, 0.1, 86400
            ),
            audit_buffer_records=integer("CRYPTO_AUDIT_BUFFER", defaults.audit_buffer_records, 1, 10_000_000),
            **hsm,
        )


def _rotation_settings(number: Callable[[str, float, float, float], float], defaults: Settings) -> tuple[float, float]:
    """CRYPTO_ROTATION_INTERVAL and CRYPTO_ROTATION_LEASE: the lease must outlast the interval, or the holder would
    lose it between two of its own passes."""
    interval = number("CRYPTO_ROTATION_INTERVAL", defaults.rotation_interval_s, 0, 3600)
    lease = number("CRYPTO_ROTATION_LEASE", defaults.rotation_lease_s, 1, 86400)
    if interval > 0 and lease <= interval:
        raise ConfigError(
            f"CRYPTO_ROTATION_LEASE ({lease:g} s) must be longer than CRYPTO_ROTATION_INTERVAL ({interval:g} s)"
        )
    return interval, lease


MAX_PROCESSES = 256
CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _processes(raw: str) -> int:
    """CRYPTO_PROCESSES: a number, or `auto` (the CPUs this process may use)."""
    raw = raw.strip().lower()
    if not raw:
        return 1
    if raw == "auto":
        return min(available_cpus(), MAX_PROCESSES)
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"CRYPTO_PROCESSES must be a number of processes or auto, got {raw!r}") from None
    if not 1 <= value <= MAX_PROCESSES:
        raise ConfigError(f"CRYPTO_PROCESSES must be between 1 and {MAX_PROCESSES} (or auto), got {value}")
    return value


def available_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs this process may use: those it may be scheduled on, fewer when a cgroup (v2) CPU quota says
    so (`cpu.max` is "<quota> <period>" in microseconds, or "max <period>"); at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            cpus = min(cpus, -(-int(quota) // int(period)))  # a quota of 1.5 CPUs keeps 2 processes busy
    except (OSError, ValueError):
        pass  # no cgroup v2 limit visible: the CPU count stands
    return max(1, cpus)


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _security_settings(
    env: Mapping[str, str], flag: Callable[[str], bool], number: Callable[[str, float, float, float], float]
) -> dict[str, Any]:
    """The CRYPTO_TLS_*, CRYPTO_JWT*/JWKS, CRYPTO_POLICY_FILE and CRYPTO_REFLECTION settings, checked together."""

    def path(name: str) -> Path | None:
        raw = env.get(name, "").strip()
        return Path(raw) if raw else None

    cert, key, client_ca = path("CRYPTO_TLS_CERT_FILE"), path("CRYPTO_TLS_KEY_FILE"), path("CRYPTO_TLS_CLIENT_CA_FILE")
    if (cert is None) != (key is None):
        raise ConfigError("CRYPTO_TLS_CERT_FILE and CRYPTO_TLS_KEY_FILE go together: set both or neither")
    if client_ca is not None and cert is None:
        raise ConfigError("CRYPTO_TLS_CLIENT_CA_FILE (mTLS) needs CRYPTO_TLS_CERT_FILE and CRYPTO_TLS_KEY_FILE")
    jwks = path("CRYPTO_JWKS_FILE")
    issuer = env.get("CRYPTO_JWT_ISSUER", "").strip() or None
    audience = env.get("CRYPTO_JWT_AUDIENCE", "").strip() or None
    if jwks is not None and (issuer is None or audience is None):
        raise ConfigError("CRYPTO_JWKS_FILE needs CRYPTO_JWT_ISSUER and CRYPTO_JWT_AUDIENCE (every token is checked)")
    if jwks is None and (issuer or audience):
        raise ConfigError("CRYPTO_JWT_ISSUER and CRYPTO_JWT_AUDIENCE need CRYPTO_JWKS_FILE (the issuer's public keys)")
    policy = path("CRYPTO_POLICY_FILE")
    if policy is not None and client_ca is None and jwks is None:
        raise ConfigError(
            "CRYPTO_POLICY_FILE needs a way for callers to prove who they are: CRYPTO_TLS_CLIENT_CA_FILE (mTLS) "
            "or CRYPTO_JWKS_FILE (bearer tokens)"
        )
    reflection = flag("CRYPTO_REFLECTION") if env.get("CRYPTO_REFLECTION", "").strip() else None
    return {
        "tls_cert_file": cert,
        "tls_key_file": key,
        "tls_client_ca_file": client_ca,
        "jwks_file": jwks,
        "jwt_issuer": issuer,
        "jwt_audience": audience,
        "policy_file": policy,
        "reflection": reflection,
        "reload_interval_s": number("CRYPTO_RELOAD_INTERVAL", 1.0, 0, 3600),
    }


def _pkcs11_settings(
    env: Mapping[str, str], *, root_key: str | None, root_key_file: str | None, other_file: str | None
) -> dict[str, Any]:
    """The CRYPTO_ROOT_KEY_PROVIDER and CRYPTO_PKCS11_* settings, checked against the file root key's."""

    def value(name: str) -> str | None:
        return env.get(name, "").strip() or None

    provider = (value("CRYPTO_ROOT_KEY_PROVIDER") or "file").lower()
    if provider not in {"file", "pkcs11"}:
        raise ConfigError(f"CRYPTO_ROOT_KEY_PROVIDER must be file or pkcs11, got {provider!r}")
    library, token_label, pin_file = (
        value("CRYPTO_PKCS11_LIBRARY"),
        value("CRYPTO_PKCS11_TOKEN_LABEL"),
        value("CRYPTO_PKCS11_PIN_FILE"),
    )
    key_label, other_key_label = value("CRYPTO_PKCS11_KEY_LABEL"), value("CRYPTO_PKCS11_OTHER_KEY_LABEL")
    token_needed = []
    if provider == "pkcs11":
        if root_key or root_key_file:
            raise ConfigError(
                "CRYPTO_ROOT_KEY_PROVIDER=pkcs11 takes the root key from the HSM: unset CRYPTO_ROOT_KEY and "
                "CRYPTO_ROOT_KEY_FILE (to move from a file root key to the HSM, set the file as "
                "CRYPTO_OTHER_ROOT_KEY_FILE and run crypto-rewrap-root)"
            )
        token_needed.append("CRYPTO_ROOT_KEY_PROVIDER=pkcs11")
        if key_label is None:
            raise ConfigError("CRYPTO_ROOT_KEY_PROVIDER=pkcs11 needs CRYPTO_PKCS11_KEY_LABEL (the root key's label)")
    elif key_label is not None:
        raise ConfigError("CRYPTO_PKCS11_KEY_LABEL is only read with CRYPTO_ROOT_KEY_PROVIDER=pkcs11")
    if other_key_label is not None:
        if other_file is not None:
            raise ConfigError("set CRYPTO_OTHER_ROOT_KEY_FILE or CRYPTO_PKCS11_OTHER_KEY_LABEL, not both")
        if provider == "pkcs11" and other_key_label == key_label:
            raise ConfigError("CRYPTO_PKCS11_OTHER_KEY_LABEL names the root key itself (CRYPTO_PKCS11_KEY_LABEL)")
        token_needed.append("CRYPTO_PKCS11_OTHER_KEY_LABEL")
    if token_needed:
        missing = [
            name
            for name, setting in (
                ("CRYPTO_PKCS11_LIBRARY", library),
                ("CRYPTO_PKCS11_TOKEN_LABEL", token_label),
                ("CRYPTO_PKCS11_PIN_FILE", pin_file),
            )
            if setting is None
        ]
        if missing:
            raise ConfigError(f"{token_needed[0]} needs {', '.join(missing)}")
    return {
        "root_key_provider": provider,
        "pkcs11_library": Path(library) if library else None,
        "pkcs11_token_label": token_label,
        "pkcs11_pin_file": Path(pin_file) if pin_file else None,
        "pkcs11_key_label": key_label,
        "pkcs11_other_key_label": other_key_label,
    }


def _optional_path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw) if raw else None
