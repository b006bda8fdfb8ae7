"""Client side of the caas crypto service.

    from crypto_client import CryptoClient

    with CryptoClient("crypto-service:3009", "acme") as crypto:
        key = crypto.create_key()
        sealed = crypto.encrypt(key.key_id, b"hello")

`CryptoClient` (blocking) and `AsyncCryptoClient` (asyncio) add deadlines,
retries, a circuit breaker and a key-metadata cache to the generated stubs;
one client serves any number of tenants (`tenant_id=` on each call). Each
helper has an asyncio twin (`AsyncFileCipher`, `AsyncTokenSigner`, ...). Stubs
live in `crypto_client.v1` (regenerate with `make proto`; never edit).
See docs/client.md.
"""

from crypto_client.async_client import AsyncCryptoClient
from crypto_client.breaker import BreakerState
from crypto_client.config import BreakerPolicy, ClientConfig, RetryPolicy, tls_credentials
from crypto_client.envelope import AsyncEnvelopeCipher, DataKeyCache, EnvelopeCipher, NullDataKeyCache
from crypto_client.errors import (
    AlgorithmMismatchError,
    BackupKeyMismatchError,
    CircuitOpenError,
    ConflictError,
    CryptoClientError,
    DataIntegrityError,
    DeadlineExceededError,
    DecryptionError,
    FailedPreconditionError,
    InternalServerError,
    InvalidArgumentError,
    KeyAlreadyExistsError,
    KeyDisabledError,
    KeyExpiredError,
    KeyNotFoundError,
    KeyTypeMismatchError,
    KeyVersionDestroyedError,
    KeyVersionDisabledError,
    KeyVersionExhaustedError,
    KeyVersionStateError,
    MasterKeyUnavailableError,
    PermissionDeniedError,
    QuotaExceededError,
    ResourceExhaustedError,
    ResponseTooLargeError,
    ServiceUnavailableError,
    StreamIdleError,
    StreamLimitError,
    TenantDestroyedError,
    TenantDestructionScheduledError,
    UnauthenticatedError,
)
from crypto_client.files import AsyncFileCipher, FileCipher
from crypto_client.messaging import AsyncMessageCipher, MessageCipher
from crypto_client.metrics import ClientStats
from crypto_client.models import (
    Algorithm,
    AuditRecord,
    DataKey,
    DecryptItem,
    DecryptResult,
    EncryptItem,
    EncryptResult,
    HealthStatus,
    Key,
    KeyState,
    KeyType,
    KeyVersion,
    KeyVersionPage,
    KeyVersionState,
    MacResult,
    Progress,
    PublicKey,
    ReEncryptResult,
    SessionKey,
    SignResult,
)
from crypto_client.search import AsyncBlindIndex, BlindIndex
from crypto_client.sessions import AsyncSessionKeys, SessionKeys
from crypto_client.sync_client import CryptoClient
from crypto_client.tokens import AsyncTokenSigner, InvalidTokenError, TokenSigner

__all__ = [
    "Algorithm",
    "AlgorithmMismatchError",
    "AsyncBlindIndex",
    "AsyncCryptoClient",
    "AsyncEnvelopeCipher",
    "AsyncFileCipher",
    "AsyncMessageCipher",
    "AsyncSessionKeys",
    "AsyncTokenSigner",
    "AuditRecord",
    "BackupKeyMismatchError",
    "BlindIndex",
    "BreakerPolicy",
    "BreakerState",
    "CircuitOpenError",
    "ClientConfig",
    "ClientStats",
    "ConflictError",
    "CryptoClient",
    "CryptoClientError",
    "DataIntegrityError",
    "DataKey",
    "DataKeyCache",
    "DeadlineExceededError",
    "DecryptItem",
    "DecryptResult",
    "DecryptionError",
    "EncryptItem",
    "EncryptResult",
    "EnvelopeCipher",
    "FailedPreconditionError",
    "FileCipher",
    "HealthStatus",
    "InternalServerError",
    "InvalidArgumentError",
    "InvalidTokenError",
    "Key",
    "KeyAlreadyExistsError",
    "KeyDisabledError",
    "KeyExpiredError",
    "KeyNotFoundError",
    "KeyState",
    "KeyType",
    "KeyTypeMismatchError",
    "KeyVersion",
    "KeyVersionDestroyedError",
    "KeyVersionDisabledError",
    "KeyVersionExhaustedError",
    "KeyVersionPage",
    "KeyVersionState",
    "KeyVersionStateError",
    "MacResult",
    "MasterKeyUnavailableError",
    "MessageCipher",
    "NullDataKeyCache",
    "PermissionDeniedError",
    "Progress",
    "PublicKey",
    "QuotaExceededError",
    "ReEncryptResult",
    "ResourceExhaustedError",
    "ResponseTooLargeError",
    "RetryPolicy",
    "ServiceUnavailableError",
    "SessionKey",
    "SessionKeys",
    "SignResult",
    "StreamIdleError",
    "StreamLimitError",
    "TenantDestroyedError",
    "TenantDestructionScheduledError",
    "TokenSigner",
    "UnauthenticatedError",
    "tls_credentials",
]
