"""The domain's errors. transport/errors.py maps each to one gRPC status.

Messages are written for the caller and must never contain key material,
plaintext or associated data.
"""

from __future__ import annotations


class CryptoServiceError(Exception):
    """Base of every error the service reports to a caller on purpose."""

    # How long the caller should wait before trying again, when the service knows (sent as a RetryInfo).
    retry_after_s: float | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(CryptoServiceError):
    """A request field is missing or malformed."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class KeyNotFound(CryptoServiceError):
    """The key does not exist for this tenant (whether or not another tenant has it)."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"key {key_id!r} not found")
        self.key_id = key_id


class MasterKeyExists(CryptoServiceError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"this tenant already has a master key ({key_id}); rotate it instead of creating another")
        self.key_id = key_id


class KeyDisabled(CryptoServiceError):
    def __init__(self, key_id: str) -> None:
        super().__init__(f"key {key_id} is disabled; enable it to use it again")
        self.key_id = key_id


class KeyExpired(CryptoServiceError):
    def __init__(self, key_id: str, version: int) -> None:
        super().__init__(
            f"key {key_id} version {version} has expired and no longer encrypts; rotate the key to create a fresh "
            "primary version (expired versions still decrypt)"
        )
        self.key_id = key_id


class KeyVersionExhausted(CryptoServiceError):
    def __init__(self, key_id: str, version: int) -> None:
        super().__init__(
            f"key {key_id} version {version} has used up its encryption budget (AES-GCM with random nonces allows "
            "at most 2^32 encryptions per key, NIST SP 800-38D); rotate the key to create a fresh primary version "
            "(the exhausted version still decrypts)"
        )
        self.key_id = key_id


class KeyTypeMismatch(CryptoServiceError):
    def __init__(self, key_id: str, message: str) -> None:
        super().__init__(message)
        self.key_id = key_id


class MasterKeyUnavailable(CryptoServiceError):
    """The tenant's master key cannot wrap or unwrap right now."""


class DecryptionFailed(CryptoServiceError):
    """Any failure to decrypt. One fixed message, whatever the cause, so that a
    caller (or an attacker) learns nothing about which check failed."""

    MESSAGE = "ciphertext could not be decrypted"

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class ConcurrentModification(CryptoServiceError):
    """A concurrent writer kept winning; the caller may retry."""


class StoreUnavailable(CryptoServiceError):
    """The key store cannot be reached or did not answer in time; `retry_after_s`: when it is worth trying again,
    if known (the next probe of an open circuit)."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StoreWriteRefused(StoreUnavailable):
    """The key store answers but cannot write now (full disk, read-only files, a busy lock): reads still work."""


class StoreCallRefused(StoreUnavailable):
    """The call never reached the key store (its circuit is open, or no place in the bulkhead was free): nothing
    was written. Any other StoreUnavailable from a write leaves its outcome unknown: the store may have applied
    it (a write that timed out, or whose connection dropped, after the store received it)."""


class RootKeyUnavailable(CryptoServiceError):
    """The root key is held by an HSM that cannot be used right now (token removed, module or network down).

    Keys already unwrapped in this process keep working; a key that must be unwrapped first fails until the
    HSM is back. Never a verdict on the data: the same call succeeds once it returns.
    """

    def __init__(self, detail: str) -> None:
        # The caller learns what happened and that retrying is right; which module, token or PKCS#11 error it
        # was (`detail`) is for the server's log.
        super().__init__(
            "the root key's HSM is unavailable, so a key not used recently on this server cannot be unwrapped; "
            "retry later"
        )
        self.detail = detail


class KeyIntegrityError(CryptoServiceError):
    """A stored key does not unwrap: the store was altered or damaged. Never the caller's fault."""


class UnexpectedError(CryptoServiceError):
    """A bug met while serving one item of a batch; the item fails, the batch goes on."""

    def __init__(self) -> None:
        super().__init__("internal error processing this item; the server log has details")


class AlgorithmMismatch(CryptoServiceError):
    """The key's algorithm does not do the requested operation."""

    def __init__(self, key_id: str, algorithm: str, operation: str, needed: str) -> None:
        super().__init__(f"key {key_id} is an {algorithm} key; {operation} needs {needed}")
        self.key_id = key_id


class StreamLimitReached(CryptoServiceError):
    """The server already serves as many streams as it allows at once; each holds a worker thread."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this server already serves {limit} streams, its limit (CRYPTO_MAX_STREAMS); "
            "open the stream again later, or use unary calls"
        )
        self.limit = limit


class StreamIdle(CryptoServiceError):
    """A stream sent nothing for too long and was ended, to free the worker it held."""

    def __init__(self, idle_timeout_s: float) -> None:
        super().__init__(
            f"the stream sent no message for {idle_timeout_s:g} s (CRYPTO_STREAM_IDLE_TIMEOUT) and was ended; "
            "send the data without pauses, or in several streams"
        )
        self.idle_timeout_s = idle_timeout_s


class QuotaExceeded(CryptoServiceError):
    """The tenant is over its request quota; it may try again after `retry_after_s`."""

    def __init__(self, rate: float, retry_after_s: float) -> None:
        super().__init__(
            f"this tenant is over its quota of {rate:g} requests per second on this server "
            f"(batch items count one each); retry after {retry_after_s:.3f} s"
        )
        self.retry_after_s = retry_after_s


class ResponseTooLarge(CryptoServiceError):
    """The answer would not fit in one message; the caller must ask for less per call."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the response would be {size} bytes, over the message limit of {limit}; send fewer or smaller items"
        )


class ServerShuttingDown(CryptoServiceError):
    """The server is stopping and takes no new calls; the caller retries, reaching another replica."""

    def __init__(self) -> None:
        super().__init__("the server is shutting down and takes no new calls; retry (another replica will answer)")


class Unauthenticated(CryptoServiceError):
    """The call carries no identity this server accepts (no client certificate, no valid bearer token)."""

    def __init__(self, why: str) -> None:
        super().__init__(
            f"{why}; present a client certificate (mTLS) or an 'authorization: Bearer <JWT>' header this server accepts"
        )


class PermissionDenied(CryptoServiceError):
    """The caller may not make this call. Says nothing of whether the tenant or the key exists."""

    def __init__(self, permission: str) -> None:
        super().__init__(
            f"the caller may not do this: the access policy grants it no {permission!r} permission for this "
            "tenant and key"
        )
        self.permission = permission


class AuditUnavailable(CryptoServiceError):
    """The audit trail cannot record the call, and the call is one that must not happen unrecorded;
    `retry_after_s`: when it is worth trying again, if that is known."""

    def __init__(
        self,
        message: str = "the audit trail cannot be written, so this call was not carried out; retry later",
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class KeyVersionDestroyed(CryptoServiceError):
    """The version (its material erased) can never be used again. Says nothing about the ciphertext beyond
    what its header already named: which key and version made it."""

    def __init__(self, key_id: str, version: int) -> None:
        super().__init__(
            f"key {key_id} version {version} has been destroyed: its material is erased, so what it encrypted "
            "can never be decrypted again"
        )
        self.key_id = key_id


class KeyVersionDisabled(CryptoServiceError):
    """The version refuses every use for now (`why` says what to undo); nothing is lost."""

    def __init__(self, key_id: str, version: int, why: str) -> None:
        super().__init__(f"key {key_id} version {version} {why}")
        self.key_id = key_id


class KeyVersionStateConflict(CryptoServiceError):
    """A change the key's or version's state does not allow (the message says what would)."""

    def __init__(self, key_id: str, message: str) -> None:
        super().__init__(message)
        self.key_id = key_id


class BackupMalformed(CryptoServiceError):
    """The bytes given as a key backup are not one this server can read (docs/backup.md)."""

    def __init__(self, why: str) -> None:
        super().__init__(f"backup: not a key backup this server can read: {why}")


class BackupTampered(CryptoServiceError):
    """A key backup does not authenticate. One fixed message, whatever the cause (as DecryptionFailed)."""

    MESSAGE = (
        "backup: the backup does not authenticate: it was altered or damaged after export (any changed byte is "
        "refused); restore from an intact copy"
    )

    def __init__(self) -> None:
        super().__init__(self.MESSAGE)


class BackupKeyMismatch(CryptoServiceError):
    """The backup was encrypted for a key (backup key or root key) this server does not hold."""


class BackupKeyUnsupported(InvalidArgument):
    """A backup public (or private) key of a type or size backups do not use."""


class KeyAlreadyExists(CryptoServiceError):
    """A restore would replace an existing key (or the tenant's master key): never done."""

    def __init__(self, key_id: str, message: str) -> None:
        super().__init__(message)
        self.key_id = key_id


class TenantDestroyed(CryptoServiceError):
    """The tenant was crypto-shredded: its master key and every key under it are destroyed."""

    def __init__(self, tenant_id: str) -> None:
        super().__init__(
            f"tenant {tenant_id!r} has been destroyed (crypto-shredded): none of its keys can be used or created, "
            "and nothing it encrypted can be decrypted"
        )


class TenantDestructionScheduled(CryptoServiceError):
    """The tenant is scheduled for destruction: its keys refuse every use until it is cancelled or runs."""

    def __init__(self, tenant_id: str) -> None:
        super().__init__(
            f"tenant {tenant_id!r} is scheduled for destruction: its keys refuse every use until "
            "CancelTenantDestruction (or the destruction runs)"
        )


class TenantNotFound(KeyNotFound):
    """The tenant has no keys (so no master key to act on)."""

    def __init__(self, tenant_id: str) -> None:
        # Not KeyNotFound's: no key id to name.
        CryptoServiceError.__init__(self, f"tenant {tenant_id!r} has no keys")
