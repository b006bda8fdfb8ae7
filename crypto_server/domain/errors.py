"""The domain's errors. transport/errors.py maps each to one gRPC status.

Messages are written for the caller and must never contain key material,
plaintext or associated data.
"""

from __future__ import annotations


class CryptoServiceError(Exception):
    """Base of every error the service reports to a caller on purpose."""

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
    """The key store cannot be reached or did not answer in time."""


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
