"""MACs and signatures with a tenant's keys (with any algorithm whose key manager builds a MAC, or a signer
and verifier: HMAC-SHA256, Ed25519 and ECDSA P-256 today).

As with encryption: making a MAC or signature needs an enabled key whose
version has not expired; checking one works with any version of an enabled
key, expired or not. The private key and the MAC key never leave the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from crypto_server.domain.algorithms import MAC, SIGNER, VERIFIER, Algorithm, PrimitiveKind
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import InvalidArgument, KeyDisabled, KeyExpired
from crypto_server.domain.key_destruction import check_can_decrypt
from crypto_server.domain.keys import KeyVersionState
from crypto_server.service.crypto_operations import DEFAULT_MAX_PLAINTEXT_BYTES
from crypto_server.service.keyring import Keyring, LoadedKey


@dataclass(frozen=True, slots=True)
class Signature:
    signature: bytes
    key_id: str
    key_version: int
    algorithm: Algorithm


@dataclass(frozen=True, slots=True)
class PublicKey:
    pem: str
    key_id: str
    key_version: int
    algorithm: Algorithm


class MacsAndSignatures:
    def __init__(self, keyring: Keyring, clock: Clock, *, max_data_bytes: int = DEFAULT_MAX_PLAINTEXT_BYTES) -> None:
        self._keyring = keyring
        self._clock = clock
        self._max_data_bytes = max_data_bytes

    def _version(
        self, loaded: LoadedKey, version: int, operation: str, kind: PrimitiveKind[Any], *, making: bool
    ) -> tuple[LoadedKey, int]:
        """The key and the version to use (0: the primary), checked usable for `operation` (which needs a
        `kind` primitive). The algorithm is checked first: a key of the wrong kind is refused as such whatever
        its state."""
        if version:
            loaded = self._keyring.with_version(loaded, version)
        key = loaded.key
        self._keyring.algorithms.require(key.key_id, key.algorithm, kind, operation)
        if key.disabled:
            raise KeyDisabled(key.key_id)
        number = version or key.primary_version
        record = self._keyring.version(loaded, number)
        if record is None:
            raise InvalidArgument("key_version", f"key {key.key_id} has no version {number}")
        check_can_decrypt(key, record)
        if making and record.state_at(self._clock.now()) is KeyVersionState.EXPIRED:
            raise KeyExpired(key.key_id, number)
        return loaded, number

    def _check_size(self, field: str, data: bytes) -> None:
        if len(data) > self._max_data_bytes:
            raise InvalidArgument(field, f"is {len(data)} bytes, over the limit of {self._max_data_bytes}")

    def compute_mac(self, tenant_id: str, key_id: str, data: bytes, version: int = 0) -> tuple[bytes, int]:
        self._check_size("data", data)
        loaded = self._keyring.lookup(tenant_id, key_id)
        # Computing makes a new MAC whichever version is named, so an expired version refuses, as it
        # does for encryption: a version past its cryptoperiod only verifies.
        loaded, number = self._version(loaded, version, "ComputeMac", MAC, making=True)
        return self._keyring.mac(loaded, number).compute(data), number

    def verify_mac(self, tenant_id: str, key_id: str, data: bytes, mac: bytes, version: int = 0) -> bool:
        self._check_size("data", data)
        loaded = self._keyring.lookup(tenant_id, key_id)
        loaded, number = self._version(loaded, version, "VerifyMac", MAC, making=False)
        return self._keyring.mac(loaded, number).verify(data, mac)

    def sign(self, tenant_id: str, key_id: str, message: bytes) -> Signature:
        self._check_size("message", message)
        loaded = self._keyring.lookup(tenant_id, key_id)
        loaded, number = self._version(loaded, 0, "Sign", SIGNER, making=True)
        signature = self._keyring.signer(loaded, number).sign(message)
        return Signature(signature, loaded.key.key_id, number, loaded.key.algorithm)

    def verify(self, tenant_id: str, key_id: str, message: bytes, signature: bytes, version: int = 0) -> bool:
        self._check_size("message", message)
        loaded = self._keyring.lookup(tenant_id, key_id)
        loaded, number = self._version(loaded, version, "Verify", VERIFIER, making=False)
        return self._keyring.verifier(loaded, number).verify(message, signature)

    def public_key(self, tenant_id: str, key_id: str, version: int = 0) -> PublicKey:
        loaded = self._keyring.lookup(tenant_id, key_id)
        loaded, number = self._version(loaded, version, "GetPublicKey", VERIFIER, making=False)
        pem = self._keyring.verifier(loaded, number).public_key_pem()
        return PublicKey(pem, loaded.key.key_id, number, loaded.key.algorithm)
