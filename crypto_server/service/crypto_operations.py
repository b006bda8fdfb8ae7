"""Encrypt and Decrypt with a tenant's keys.

The hot path: with the key already in the keyring, an operation is a dict
lookup, an expiry comparison and one AES-GCM call — no store, no unwrapping.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol, TypeVar, cast

from crypto_server.domain import ciphertext as codec
from crypto_server.domain import stream_format
from crypto_server.domain.algorithms import AEAD, STREAMING_AEAD, PrimitiveKind
from crypto_server.domain.clock import Clock
from crypto_server.domain.errors import (
    CryptoServiceError,
    DecryptionFailed,
    InvalidArgument,
    KeyDisabled,
    KeyExpired,
    KeyNotFound,
    KeyTypeMismatch,
    KeyVersionDestroyed,
    KeyVersionDisabled,
    UnexpectedError,
)
from crypto_server.domain.key_destruction import check_can_decrypt, check_can_encrypt
from crypto_server.domain.keys import KeyType, KeyVersionState, validate_tenant_id
from crypto_server.domain.limits import MAX_AAD_BYTES
from crypto_server.service.keyring import Keyring, LoadedKey
from crypto_server.service.usage_budget import UsageBudget
from crypto_server.storage.port import VersionRef

log = logging.getLogger(__name__)
DEFAULT_MAX_PLAINTEXT_BYTES = 1024 * 1024
DEFAULT_MAX_BATCH_ITEMS = 1000
# Request bytes (plaintexts or ciphertexts, and aads) in one batch; the configuration checks that the answer
# to the largest batch fits in one message.
DEFAULT_MAX_BATCH_BYTES = 8 * 1024 * 1024
DATA_KEY_BYTES = 32


@dataclass(frozen=True, slots=True)
class Encrypted:
    ciphertext: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class Decrypted:
    plaintext: bytes
    key_id: str
    key_version: int


@dataclass(frozen=True, slots=True)
class ReEncrypted:
    encrypted: Encrypted
    source_key_id: str
    source_key_version: int


@dataclass(frozen=True, slots=True)
class EncryptItem:
    key_id: str
    plaintext: bytes
    aad: bytes = b""


@dataclass(frozen=True, slots=True)
class DecryptItem:
    ciphertext: bytes
    aad: bytes = b""
    key_id: str = ""


class CryptoOperations:
    def __init__(
        self,
        keyring: Keyring,
        clock: Clock,
        *,
        max_plaintext_bytes: int = DEFAULT_MAX_PLAINTEXT_BYTES,
        max_batch_items: int = DEFAULT_MAX_BATCH_ITEMS,
        max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
        budget: UsageBudget | None = None,
    ) -> None:
        if max_plaintext_bytes < 1 or max_batch_items < 1 or max_batch_bytes < 1:
            raise ValueError("max_plaintext_bytes, max_batch_items and max_batch_bytes must be positive")
        self._keyring = keyring
        self._clock = clock
        self.max_plaintext_bytes = max_plaintext_bytes
        self.max_batch_items = max_batch_items
        self.max_batch_bytes = max_batch_bytes
        self._budget = budget

    def encrypt(self, tenant_id: str, key_id: str, plaintext: bytes, aad: bytes = b"") -> Encrypted:
        self._check_encrypt_arguments(plaintext, aad)
        loaded, version = self._encrypting_version(tenant_id, key_id, "Encrypt", AEAD)
        aead = self._keyring.aead(loaded, version)
        sealed = codec.encrypt(aead, tenant_id, loaded.key_uuid, version, plaintext, aad)
        return Encrypted(ciphertext=sealed, key_id=key_id, key_version=version)

    def _check_encrypt_arguments(self, plaintext: bytes, aad: bytes) -> None:
        if len(plaintext) > self.max_plaintext_bytes:
            raise InvalidArgument(
                "plaintext",
                f"is {len(plaintext)} bytes, over the limit of {self.max_plaintext_bytes}; "
                "split the data or use envelope encryption",
            )
        _check_aad(aad)

    def _encrypting_version(
        self, tenant_id: str, key_id: str, operation: str, kind: PrimitiveKind[Any]
    ) -> tuple[LoadedKey, int]:
        """The key and the version new ciphertexts use, checked able to encrypt now (with a `kind` primitive),
        with one use of the version's budget counted."""
        loaded, version = self._usable_primary(tenant_id, key_id, operation, kind)
        if self._budget is not None:
            # Every caller encrypts once with the version it gets (a stream: its header's one data key).
            self._budget.record(VersionRef(tenant_id, loaded.key.key_id, version))
        return loaded, version

    def _usable_primary(
        self, tenant_id: str, key_id: str, operation: str, kind: PrimitiveKind[Any]
    ) -> tuple[LoadedKey, int]:
        """The key and the version new ciphertexts use, checked able to encrypt now; no use counted."""
        loaded = self._keyring.lookup(tenant_id, key_id)
        key = loaded.key
        self._keyring.algorithms.require(key_id, key.algorithm, kind, operation)
        if key.key_type is KeyType.MASTER:
            raise KeyTypeMismatch(
                key_id, f"key {key_id} is the tenant's master key, which only wraps other keys; encrypt with a data key"
            )
        if key.disabled:
            raise KeyDisabled(key_id)
        primary = key.primary
        if primary.destroy_at is not None or primary.destroyed:
            self._refuse(loaded, lambda: check_can_encrypt(key))
        if primary.state_at(self._clock.now()) is KeyVersionState.EXPIRED:
            raise KeyExpired(key_id, primary.version)
        return loaded, primary.version

    def _decrypting_key(
        self, tenant_id: str, named: LoadedKey | None, key_id: uuid.UUID, version: int, kind: PrimitiveKind[Any]
    ) -> LoadedKey:
        """The key a ciphertext names, if it can open it (with a `kind` primitive); anything wrong with the
        ciphertext is DecryptionFailed."""
        if named is not None and key_id != named.key_uuid:
            raise DecryptionFailed()
        try:
            loaded = self._keyring.with_version(named or self._keyring.lookup(tenant_id, str(key_id)), version)
        except KeyNotFound:
            raise DecryptionFailed() from None
        key = loaded.key
        if key.key_type is KeyType.MASTER or not self._keyring.algorithms.builds(key.algorithm, kind):
            raise DecryptionFailed()
        record = self._keyring.version(loaded, version)
        if record is None:
            raise DecryptionFailed()
        if key.disabled:
            raise KeyDisabled(key.key_id)
        self._refuse(loaded, lambda: check_can_decrypt(key, record))
        return loaded

    def _refuse(self, loaded: LoadedKey, check: Callable[[], None]) -> None:
        """Run a version check; a refusal of a tenant's key says so when the whole tenant is destroyed or
        scheduled for destruction (TENANT_DESTROYED is clearer than the version's own state)."""
        try:
            check()
        except (KeyVersionDestroyed, KeyVersionDisabled):
            self._keyring.check_tenant(loaded.key)
            raise

    def decrypt(self, tenant_id: str, ciphertext: bytes, aad: bytes = b"", key_id: str = "") -> Decrypted:
        """Open a ciphertext made by `encrypt`.

        Every problem with the ciphertext itself, including naming a key this
        tenant does not have, is the one DecryptionFailed: a caller cannot tell
        another tenant's ciphertext from garbage. An explicit `key_id` that
        does not exist is NOT_FOUND, as everywhere else.
        """
        validate_tenant_id(tenant_id)
        _check_aad(aad)
        named = self._keyring.lookup(tenant_id, key_id) if key_id else None
        if len(ciphertext) > self.max_plaintext_bytes + codec.OVERHEAD_BYTES:
            raise DecryptionFailed()
        header = codec.read_header(ciphertext)
        loaded = self._decrypting_key(tenant_id, named, header.key_id, header.key_version, AEAD)
        aead = self._keyring.aead(loaded, header.key_version)
        plaintext = codec.decrypt(aead, tenant_id, ciphertext, aad)
        return Decrypted(plaintext=plaintext, key_id=loaded.key.key_id, key_version=header.key_version)

    # -- streams ---------------------------------------------------------------------

    def encrypt_stream(
        self, tenant_id: str, key_id: str, aad: bytes, chunks: Iterator[bytes | memoryview]
    ) -> tuple[Encrypted, Iterator[list[bytes]]]:
        """The key and version used, and the stream, in order: header, then segments as `chunks` arrive (a list
        of pieces at a time, for the caller to send joined).
        Memory: at most one segment of plaintext, whatever the stream's length."""
        _check_aad(aad)
        loaded, version = self._encrypting_version(tenant_id, key_id, "EncryptStream", STREAMING_AEAD)
        encryptor = self._keyring.streaming_aead(loaded, version).encryptor(tenant_id, loaded.key_uuid, version, aad)
        return Encrypted(b"", key_id, version), stream_format.encrypt_all(encryptor, chunks)

    def decrypt_stream(
        self, tenant_id: str, aad: bytes, key_id: str, chunks: Iterator[bytes | memoryview]
    ) -> tuple[Decrypted, Iterator[list[bytes]]]:
        """Read the header from `chunks`, then the plaintext segment by segment (a list of segments at a time).
        Truncation is only detected at the end: what came before is not to be trusted until the stream ends
        without error."""
        validate_tenant_id(tenant_id)
        _check_aad(aad)
        named = self._keyring.lookup(tenant_id, key_id) if key_id else None
        start = bytearray()
        for chunk in chunks:
            start += chunk
            if len(start) >= stream_format.HEADER_BYTES:
                break
        header = stream_format.read_header(bytes(start))
        loaded = self._decrypting_key(tenant_id, named, header.key_id, header.key_version, STREAMING_AEAD)
        decryptor = self._keyring.streaming_aead(loaded, header.key_version).decryptor(tenant_id, header, aad)

        def plaintext() -> Iterator[list[bytes]]:
            opened = decryptor.update_segments(bytes(start[stream_format.HEADER_BYTES :]))
            if opened:
                yield opened
            for chunk in chunks:
                opened = decryptor.update_segments(chunk)
                if opened:
                    yield opened
            yield [decryptor.finish()]

        return Decrypted(b"", loaded.key.key_id, header.key_version), plaintext()

    # -- envelope encryption and migration ----------------------------------------

    def generate_data_key(self, tenant_id: str, key_id: str, aad: bytes = b"") -> tuple[bytes, Encrypted]:
        """A fresh 256-bit data key, and the same key encrypted under `key_id` (an ordinary ciphertext)."""
        data_key = os.urandom(DATA_KEY_BYTES)
        return data_key, self.encrypt(tenant_id, key_id, data_key, aad)

    def re_encrypt(
        self,
        tenant_id: str,
        ciphertext: bytes,
        aad: bytes = b"",
        *,
        source_key_id: str = "",
        destination_key_id: str = "",
    ) -> ReEncrypted:
        """Decrypt and encrypt again (under the source key's primary version, or `destination_key_id`);
        the plaintext stays in this function."""
        opened = self.decrypt(tenant_id, ciphertext, aad, source_key_id)
        sealed = self.encrypt(tenant_id, destination_key_id or opened.key_id, opened.plaintext, aad)
        return ReEncrypted(sealed, source_key_id=opened.key_id, source_key_version=opened.key_version)

    # -- batches -------------------------------------------------------------------

    def _check_batch(self, tenant_id: str, count: int, size: int) -> None:
        validate_tenant_id(tenant_id)
        if count > self.max_batch_items:
            raise InvalidArgument("items", f"has {count} items, over the limit of {self.max_batch_items} per batch")
        if size > self.max_batch_bytes:
            raise InvalidArgument(
                "items",
                f"hold {size} bytes of data and aad, over the limit of {self.max_batch_bytes} bytes per batch "
                "(CRYPTO_MAX_BATCH_BYTES); split the batch",
            )

    def batch_encrypt(self, tenant_id: str, items: Sequence[BatchEncryptItem]) -> list[Encrypted | CryptoServiceError]:
        """Each item's ciphertext, or the error that item alone gets; one bad item never fails the batch.

        Each item gets what `encrypt` would give it, in the request's order, but the work that depends only on
        the key is done once per distinct key: one keyring lookup and state check, one primitive, and one
        budget call taking all its items' uses (`UsageBudget.record_many`; when the hard limit leaves k uses,
        the key's first k items are sealed and the rest refused, each with its own error)."""
        self._check_batch(tenant_id, len(items), sum(len(i.plaintext) + len(i.aad) for i in items))
        outcomes: list[Encrypted | CryptoServiceError | None] = [None] * len(items)
        by_key: dict[str, list[int]] = {}
        max_plaintext = self.max_plaintext_bytes
        for index, item in enumerate(items):
            if len(item.plaintext) > max_plaintext or len(item.aad) > MAX_AAD_BYTES:
                outcomes[index] = _outcome(partial(self._check_encrypt_arguments, item.plaintext, item.aad))
            else:
                by_key.setdefault(item.key_id, []).append(index)
        for key_id, indexes in by_key.items():
            try:
                self._seal_with_key(tenant_id, key_id, items, indexes, outcomes)
            except CryptoServiceError as error:
                _fill(outcomes, indexes, error)
            except Exception:
                log.exception("unexpected error in a batch item")
                _fill(outcomes, indexes, UnexpectedError())
        return cast(list[Encrypted | CryptoServiceError], outcomes)

    def _seal_with_key(
        self,
        tenant_id: str,
        key_id: str,
        items: Sequence[BatchEncryptItem],
        indexes: list[int],
        outcomes: list[Encrypted | CryptoServiceError | None],
    ) -> None:
        loaded, version = self._usable_primary(tenant_id, key_id, "Encrypt", AEAD)
        sealer = codec.Sealer(self._keyring.aead(loaded, version), tenant_id, loaded.key_uuid, version)
        budget = self._budget
        ref = VersionRef(tenant_id, loaded.key.key_id, version)
        counted, refusal = (len(indexes), None) if budget is None else budget.record_many(ref, len(indexes))
        for position, index in enumerate(indexes):
            if position >= counted:
                # What stopped the count (the hard limit, the store) stops the rest of the key's items alike.
                assert refusal is not None
                outcomes[index] = refusal
                continue
            item = items[index]
            outcomes[index] = Encrypted(sealer.seal(item.plaintext, item.aad), key_id, version)

    def batch_decrypt(self, tenant_id: str, items: Sequence[BatchDecryptItem]) -> list[Decrypted | CryptoServiceError]:
        """Each item's plaintext, or the error that item alone gets (what `decrypt` would give it). The key a
        ciphertext names is looked up and checked once per distinct (named key, key id, version) in the batch."""
        self._check_batch(tenant_id, len(items), sum(len(i.ciphertext) + len(i.aad) for i in items))
        named_keys: dict[str, LoadedKey | CryptoServiceError] = {}
        openers: dict[tuple[str, bytes], tuple[codec.Opener, str, int] | CryptoServiceError] = {}
        longest = self.max_plaintext_bytes + codec.OVERHEAD_BYTES
        outcomes: list[Decrypted | CryptoServiceError] = []
        for item in items:
            ciphertext, aad, key_id = item.ciphertext, item.aad, item.key_id
            if len(aad) > MAX_AAD_BYTES:
                outcomes.append(_aad_too_long(aad))
                continue
            named: LoadedKey | None = None
            if key_id:
                looked_up = named_keys.get(key_id)
                if looked_up is None:
                    looked_up = named_keys[key_id] = _outcome(partial(self._keyring.lookup, tenant_id, key_id))
                if isinstance(looked_up, CryptoServiceError):
                    outcomes.append(looked_up)
                    continue
                named = looked_up
            if len(ciphertext) > longest or len(ciphertext) < codec.OVERHEAD_BYTES:
                outcomes.append(DecryptionFailed())
                continue
            slot = (key_id, ciphertext[: codec.HEADER_BYTES])
            opener = openers.get(slot)
            if opener is None:
                opener = openers[slot] = _outcome(partial(self._opener, tenant_id, named, ciphertext))
            if isinstance(opener, CryptoServiceError):
                outcomes.append(opener)
                continue
            aead, opened_key_id, version = opener
            try:
                outcomes.append(Decrypted(aead.open(ciphertext, aad), opened_key_id, version))
            except DecryptionFailed as error:
                outcomes.append(error)
        return outcomes

    def _opener(self, tenant_id: str, named: LoadedKey | None, ciphertext: bytes) -> tuple[codec.Opener, str, int]:
        header = codec.read_header(ciphertext)
        loaded = self._decrypting_key(tenant_id, named, header.key_id, header.key_version, AEAD)
        opener = codec.Opener(self._keyring.aead(loaded, header.key_version), tenant_id)
        return opener, loaded.key.key_id, header.key_version


class BatchEncryptItem(Protocol):
    """One item of a batch to encrypt: an EncryptItem, or a request's item as the transport received it."""

    @property
    def key_id(self) -> str: ...
    @property
    def plaintext(self) -> bytes: ...
    @property
    def aad(self) -> bytes: ...


class BatchDecryptItem(Protocol):
    """One item of a batch to decrypt: a DecryptItem, or a request's item as the transport received it."""

    @property
    def ciphertext(self) -> bytes: ...
    @property
    def aad(self) -> bytes: ...
    @property
    def key_id(self) -> str: ...


def _fill(outcomes: list[Any], indexes: list[int], error: CryptoServiceError) -> None:
    """`error` for each of `indexes` not already decided (a key's failure after some of its items were sealed)."""
    for index in indexes:
        if outcomes[index] is None:
            outcomes[index] = error


_Result = TypeVar("_Result")


def _outcome(operation: Callable[[], _Result]) -> _Result | CryptoServiceError:
    try:
        return operation()
    except CryptoServiceError as error:
        return error
    except Exception:
        log.exception("unexpected error in a batch item")
        return UnexpectedError()


def _check_aad(aad: bytes) -> None:
    if len(aad) > MAX_AAD_BYTES:
        raise _aad_too_long(aad)


def _aad_too_long(aad: bytes) -> InvalidArgument:
    return InvalidArgument("aad", f"is {len(aad)} bytes, over the limit of {MAX_AAD_BYTES}")
