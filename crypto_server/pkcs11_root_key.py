"""The root key in an HSM: a PKCS#11 AES-256 key object that wraps and unwraps inside the token.

The key object is created by `crypto-init-hsm` with CKA_SENSITIVE=true and CKA_EXTRACTABLE=false: the module
refuses to hand out its value, in the clear or wrapped, so this process only ever holds a handle to it. Every
use is one CKM_AES_GCM call with a 96-bit nonce chosen here and the same associated data as the file key, so a
wrapped value is `nonce (12) || ciphertext || tag (16)` whichever provider made it, and `crypto-rewrap-root`
moves a store between a file key and an HSM key in either direction.

Sessions: a PKCS#11 session is not to be used by two threads at once, so the key keeps a small pool of them
(`sessions`, one call each at a time); a call waits for a free one. Calls into the module are serialised as
well (Pkcs11Module says why). The user is logged in once per token through a session kept open for that
purpose (login state belongs to the application, not to a session).

Failures: a call that fails for any reason other than the data not authenticating discards its session and
raises RootKeyUnavailable. The next call (or the health probe) reconnects: a new session, the key found again
by its label; when that fails too, the module is re-initialised (C_Finalize, C_Initialize), which is how a
module notices a token that was removed and came back. Reconnecting is tried at most once per
`retry_interval_s`; in between, calls fail at once without touching the module. A refused PIN is never tried
again (a few wrong PINs lock a token): the key stays unavailable until a restart with the right PIN.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pkcs11
from cryptography.exceptions import InvalidTag
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11 import exceptions as p11
from pkcs11.mechanisms import GCMParams

from crypto_server.config import ConfigError, Settings
from crypto_server.domain.errors import RootKeyUnavailable
from crypto_server.domain.key_wrap import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from crypto_server.root_key import RootKeyStats

log = logging.getLogger(__name__)

DEFAULT_SESSIONS = 4
DEFAULT_RETRY_INTERVAL_S = 1.0
# How long a call waits for a free session before it gives up (the HSM is too slow or hangs).
_SESSION_WAIT_S = 5.0
_TAG_BITS = TAG_BYTES * 8
_PROBE_AAD = b"caas.crypto.v1/root-key-probe\x00"
_FINGERPRINT_AAD = b"caas.crypto.v1/root-key-fingerprint\x00"
# The one nonce never drawn at random for this key (a 2^-96 chance), used for its fingerprint and nothing
# else: one message under one nonce reveals nothing about the key.
_FINGERPRINT_NONCE = bytes(NONCE_BYTES)
_FINGERPRINT_BYTES = 8
# Errors that say the input does not decrypt (a wrong key, a changed nonce, data or tag), not that the token
# failed. SoftHSM2 reports a bad GCM tag as CKR_GENERAL_ERROR, which is ambiguous: that one is settled by a probe.
_NOT_AUTHENTIC = (p11.EncryptedDataInvalid, p11.EncryptedDataLenRange)
_PIN_REFUSED = (p11.PinIncorrect, p11.PinInvalid, p11.PinLenRange, p11.PinLocked, p11.PinExpired)


class _PinRefused(Exception):
    pass


class Pkcs11Module:
    """One PKCS#11 library loaded in this process, shared by every key on it.

    python-pkcs11 initialises a module with C_Initialize(NULL_PTR), which tells it that the application will not
    call it from several threads at once: a module may then skip its own locking (SoftHSM2 does, and fails
    concurrent calls with CKR_GENERAL_ERROR). So every call into the module holds one lock (`calls()`); only
    cold paths call it, and one call costs the HSM's latency.

    A module is initialised once per process, so re-initialising it invalidates every session of every key on
    it: each session is tagged with the `generation` it was opened in and dropped when that has moved on.
    """

    _loaded: ClassVar[dict[Path, Pkcs11Module]] = {}
    _loaded_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, library: Any, path: Path) -> None:
        self._library = library
        self.path = path
        self.generation = 0
        self._serial = threading.RLock()
        # Per token label, the session that holds the login, kept open for as long as the module generation.
        self._logins: dict[str, tuple[int, Any]] = {}

    @classmethod
    def load(cls, path: Path) -> Pkcs11Module:
        """The module at `path`, loaded once per process. Raises ConfigError when it cannot be loaded."""
        with cls._loaded_lock:
            module = cls._loaded.get(path)
            if module is None:
                if not path.is_file():
                    raise ConfigError(f"CRYPTO_PKCS11_LIBRARY {path} does not exist")
                try:
                    library = pkcs11.lib(str(path))
                except (p11.PKCS11Error, OSError) as error:
                    detail = str(error) or type(error).__name__
                    raise ConfigError(
                        f"CRYPTO_PKCS11_LIBRARY {path} cannot be loaded as a PKCS#11 module: {detail}"
                    ) from None
                module = cls._loaded[path] = cls(library, path)
            return module

    @contextlib.contextmanager
    def calls(self) -> Iterator[int]:
        """Call into the module within this block, alone; yields its generation."""
        with self._serial:
            yield self.generation

    def reinitialise(self, seen_generation: int) -> None:
        """C_Finalize and C_Initialize, unless another thread already did since `seen_generation`."""
        with self._serial:
            if self.generation != seen_generation:
                return
            try:
                with contextlib.suppress(p11.PKCS11Error):
                    self._library.reinitialize()
            finally:
                self.generation += 1
                self._logins.clear()
        log.info("PKCS#11 module re-initialised", extra={"library": str(self.path)})

    def token(self, label: str) -> Any:
        try:
            return self._library.get_token(token_label=label)
        except p11.NoSuchToken:
            labels = []
            for slot in self._library.get_slots(token_present=True):
                with contextlib.suppress(p11.PKCS11Error):
                    labels.append(slot.get_token().label)
            labels = [name for name in labels if name]  # an uninitialised token has no label
            raise ConfigError(
                f"CRYPTO_PKCS11_TOKEN_LABEL: {self.path} has no token labelled {label!r} "
                f"(tokens present: {', '.join(repr(name) for name in labels) or 'none'})"
            ) from None

    def open_session(self, token: Any, pin: str, generation: int, *, rw: bool = False) -> Any:
        """A session on `token`, the user logged in (once per token and generation, through a session kept
        for it). Raises _PinRefused for a PIN the token refuses."""
        with self._serial:
            held = self._logins.get(token.label)
            if held is None or held[0] != generation:
                try:
                    login = token.open(user_pin=pin)
                except p11.UserAlreadyLoggedIn:
                    login = token.open()  # logged in already, by a session of an earlier generation
                except _PIN_REFUSED as error:
                    raise _PinRefused(type(error).__name__) from None
                self._logins[token.label] = (generation, login)
        return token.open(rw=rw)


@dataclass(slots=True)
class _Session:
    session: Any
    key: Any
    generation: int


def _gcm(nonce: bytes, associated_data: bytes | None) -> GCMParams:
    return GCMParams(nonce, associated_data or None, _TAG_BITS)


class Pkcs11RootKey:
    """A root key held by a PKCS#11 token; a RootKey (crypto_server/root_key.py)."""

    def __init__(
        self,
        module: Pkcs11Module,
        token_label: str,
        key_label: str,
        pin: str,
        *,
        sessions: int = DEFAULT_SESSIONS,
        retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S,
    ) -> None:
        """Connect to the token and find the key; raises ConfigError naming the setting that is wrong."""
        if sessions < 1:
            raise ValueError("a PKCS#11 root key needs at least one session")
        self._module = module
        self._token_label = token_label
        self._key_label = key_label
        self._pin = pin
        self._retry_interval_s = retry_interval_s
        self._slots = threading.BoundedSemaphore(sessions)
        self._lock = threading.Lock()
        self._idle: list[_Session] = []
        self._unavailable: str | None = None
        self._retry_at = 0.0
        self._pin_refused = False
        self._operations = self._errors = 0
        self._seconds = 0.0
        self.source = f"pkcs11 token {token_label!r} key {key_label!r}"
        try:
            first = self._connect()
        except _PinRefused as refused:
            raise ConfigError(
                f"CRYPTO_PKCS11_PIN_FILE: token {token_label!r} refused the PIN ({refused}); "
                "check the file (each wrong PIN counts towards locking the token)"
            ) from None
        except (p11.NoSuchKey, p11.MultipleObjectsReturned) as error:
            raise ConfigError(self._key_problem(error)) from None
        except p11.PKCS11Error as error:
            raise ConfigError(f"{self.source} cannot be used: {type(error).__name__} {error}".rstrip()) from None
        try:
            with module.calls():
                # Why this key must not be the root key, if anything (refused unless CRYPTO_ALLOW_INSECURE).
                self.unfit: str | None = key_attributes_problem(first.key)
                self.fingerprint = self._fingerprint(first.key)
        except p11.PKCS11Error as error:
            raise ConfigError(
                f"{self.source} does not do CKM_AES_GCM with a 96-bit nonce of ours ({type(error).__name__}); "
                "docs/operations.md lists what the module must allow"
            ) from None
        self._release(first)

    def _key_problem(self, error: Exception) -> str:
        if isinstance(error, p11.MultipleObjectsReturned):
            return (
                f"CRYPTO_PKCS11_KEY_LABEL: token {self._token_label!r} holds several secret keys labelled "
                f"{self._key_label!r}; which one is the root key is ambiguous"
            )
        return (
            f"CRYPTO_PKCS11_KEY_LABEL: token {self._token_label!r} has no secret key labelled {self._key_label!r}; "
            "create it with crypto-init-hsm"
        )

    # The RootKey protocol.

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes:
        params = _gcm(nonce, associated_data)
        result: bytes = self._call(lambda key: key.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params))
        return result

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes:
        if len(nonce) != NONCE_BYTES or len(data) < TAG_BYTES:
            raise InvalidTag
        params = _gcm(nonce, associated_data)
        result: bytes = self._call(
            lambda key: key.decrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=params), decrypting=True
        )
        return result

    def check(self) -> None:
        self._call(self._probe)

    def stats(self) -> RootKeyStats:
        with self._lock:
            return RootKeyStats(self._operations, self._errors, self._seconds, available=self._unavailable is None)

    def stop(self) -> None:
        """Close the idle sessions (the login session stays with the module, which other keys may share)."""
        with self._lock:
            idle, self._idle = self._idle, []
        for held in idle:
            with contextlib.suppress(p11.PKCS11Error), self._module.calls() as generation:
                if generation == held.generation:
                    held.session.close()

    # Sessions.

    def _connect(self) -> _Session:
        """A new session with the key found in it. Raises PKCS11Error, _PinRefused."""
        with self._module.calls() as generation:
            token = self._module.token(self._token_label)
            session = self._module.open_session(token, self._pin, generation)
            try:
                key = session.get_key(object_class=ObjectClass.SECRET_KEY, label=self._key_label)
            except BaseException:
                with contextlib.suppress(p11.PKCS11Error):
                    session.close()
                raise
            return _Session(session, key, generation)

    def _take(self) -> _Session:
        with self._lock:
            while self._idle:
                held = self._idle.pop()
                if held.generation == self._module.generation:
                    return held
            if self._pin_refused:
                raise RootKeyUnavailable("the token refused the PIN; restart with the right CRYPTO_PKCS11_PIN_FILE")
            if self._unavailable is not None and time.monotonic() < self._retry_at:
                raise RootKeyUnavailable(self._unavailable)
        return self._reconnect()

    def _reconnect(self) -> _Session:
        """A new session; after a failure, once more on a re-initialised module (a token that came back)."""
        seen = self._module.generation
        try:
            try:
                return self._connect()
            except (p11.PKCS11Error, ConfigError):
                pass
            self._module.reinitialise(seen)
            return self._connect()
        except _PinRefused as refused:
            with self._lock:
                self._pin_refused = True
            self._failed(f"the token refused the PIN ({refused})")
            raise RootKeyUnavailable(f"the token refused the PIN ({refused})") from None
        except (p11.PKCS11Error, ConfigError) as error:
            detail = self._describe(error)
            self._failed(detail)
            raise RootKeyUnavailable(detail) from None

    def _release(self, held: _Session) -> None:
        with self._lock:
            if held.generation == self._module.generation:
                self._idle.append(held)
            if self._unavailable is not None:
                log.info("root key HSM reachable again", extra={"source": self.source})
                self._unavailable = None

    def _failed(self, detail: str) -> None:
        with self._lock:
            if self._unavailable is None:
                log.warning("root key HSM unavailable", extra={"source": self.source, "detail": detail})
            self._unavailable = detail
            self._retry_at = time.monotonic() + self._retry_interval_s

    def _describe(self, error: Exception) -> str:
        if isinstance(error, ConfigError):
            return str(error)
        if isinstance(error, p11.NoSuchKey | p11.MultipleObjectsReturned):
            return self._key_problem(error)
        return f"{self.source}: {type(error).__name__}"

    def _call(self, operation: Callable[[Any], Any], *, decrypting: bool = False) -> Any:
        started = time.monotonic()
        ok = False
        if not self._slots.acquire(timeout=_SESSION_WAIT_S):
            self._count(started, ok=False)
            raise RootKeyUnavailable(f"{self.source}: every session is busy (the HSM answers too slowly)")
        try:
            held = self._take()
            try:
                with self._module.calls() as generation:
                    if generation != held.generation:
                        raise p11.SessionHandleInvalid
                    result = operation(held.key)
            except _NOT_AUTHENTIC:
                if not decrypting:
                    raise
                ok = True
                self._release(held)
                raise InvalidTag from None
            except p11.GeneralError:
                if decrypting and self._still_works(held):
                    ok = True
                    self._release(held)
                    raise InvalidTag from None
                self._discard(held, "GeneralError")
                raise RootKeyUnavailable(f"{self.source}: GeneralError") from None
            except p11.PKCS11Error as error:
                self._discard(held, type(error).__name__)
                raise RootKeyUnavailable(f"{self.source}: {type(error).__name__}") from None
            ok = True
            self._release(held)
            return result
        finally:
            self._slots.release()
            self._count(started, ok=ok)

    def _still_works(self, held: _Session) -> bool:
        """Whether the key still encrypts and decrypts in this session: tells a bad tag from a failed token
        when the module reports both the same way."""
        try:
            with self._module.calls() as generation:
                return generation == held.generation and self._probe(held.key)
        except p11.PKCS11Error:
            return False

    @staticmethod
    def _probe(key: Any) -> bool:
        params = _gcm(os.urandom(NONCE_BYTES), _PROBE_AAD)
        sealed = key.encrypt(b"", mechanism=Mechanism.AES_GCM, mechanism_param=params)
        opened = key.decrypt(sealed, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        return bool(opened == b"")

    @staticmethod
    def _fingerprint(key: Any) -> str:
        params = GCMParams(_FINGERPRINT_NONCE, _FINGERPRINT_AAD, _TAG_BITS)
        tag: bytes = key.encrypt(b"", mechanism=Mechanism.AES_GCM, mechanism_param=params)
        return tag[:_FINGERPRINT_BYTES].hex()

    def _discard(self, held: _Session, detail: str) -> None:
        with contextlib.suppress(p11.PKCS11Error), self._module.calls() as generation:
            if generation == held.generation:
                held.session.close()
        self._failed(f"{self.source}: {detail}")
        # The next call reconnects at once, rather than failing until the retry interval is over: one broken
        # session (or handle) is not proof that the token is gone.
        with self._lock:
            self._retry_at = 0.0

    def _count(self, started: float, *, ok: bool) -> None:
        with self._lock:
            self._operations += 1
            self._errors += 0 if ok else 1
            self._seconds += time.monotonic() - started


def key_attributes_problem(key: Any) -> str | None:
    """What makes `key` unfit to be a root key, if anything: it must be an AES-256 key the token never lets out."""
    if key[Attribute.KEY_TYPE] != KeyType.AES or key[Attribute.VALUE_LEN] != KEY_BYTES:
        return "is not an AES-256 key"
    if not key[Attribute.SENSITIVE] or key[Attribute.EXTRACTABLE]:
        return "can leave the token (it must have CKA_SENSITIVE=true and CKA_EXTRACTABLE=false)"
    if not (key[Attribute.ENCRYPT] and key[Attribute.DECRYPT]):
        return "may not encrypt and decrypt (CKA_ENCRYPT and CKA_DECRYPT must be true)"
    return None


def open_pkcs11_root_key(settings: Settings, label: str, setting: str, pin: str) -> Pkcs11RootKey:
    """The key labelled `label` in the configured token, checked fit to be a root key. Raises ConfigError."""
    assert settings.pkcs11_library is not None and settings.pkcs11_token_label is not None
    module = Pkcs11Module.load(settings.pkcs11_library)
    key = Pkcs11RootKey(module, settings.pkcs11_token_label, label, pin)
    if key.unfit is not None:
        message = f"{setting}: the key {label!r} in token {settings.pkcs11_token_label!r} {key.unfit}"
        if not settings.allow_insecure:
            key.stop()
            raise ConfigError(f"{message}; refusing it (CRYPTO_ALLOW_INSECURE=1 accepts it knowingly)")
        log.warning("accepting an unfit root key because CRYPTO_ALLOW_INSECURE is set", extra={"detail": message})
    return key
