"""The algorithm registry: one key manager per algorithm, after Tink's key managers and Registry.

A `KeyManager` is everything the service knows about one algorithm: how to make fresh material, which key
types may use it, and which typed primitives (`Aead`, `StreamingAead`, `Mac`, `PublicKeySign`,
`PublicKeyVerify`) it builds from that material. The keyring asks for a primitive of a kind
(`keyring.aead(...)`, `keyring.mac(...)`); the registry answers with the key's manager's builder, or
AlgorithmMismatch when the key's algorithm builds no primitive of that kind. Nothing else in the service
branches on an algorithm, so a new algorithm is one module in `domain/key_managers/` and one line in its
registry (docs/development.md, "Adding an algorithm").

Every algorithm's material is MATERIAL_BYTES (32) bytes, because the key-wrapping format (domain/key_wrap.py)
wraps exactly that: a manager whose keys are larger derives them from a 32-byte seed.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

from crypto_server.domain.errors import AlgorithmMismatch

if TYPE_CHECKING:
    from crypto_server.domain.keys import KeyType
    from crypto_server.domain.stream_format import StreamDecryptor, StreamEncryptor, StreamHeader

MATERIAL_BYTES = 32
_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")


def random_material() -> bytes:
    """MATERIAL_BYTES from the operating system's CSPRNG: the material of every algorithm whose key is any
    32 bytes (AES-256, HMAC-SHA256, an Ed25519 seed)."""
    return os.urandom(MATERIAL_BYTES)


class Algorithm(str):
    """An algorithm's name (`AES_256_GCM`): stored with each key, bound into its wrapping, and the name of its
    key manager in the registry. Not a closed enum: a registered manager brings its own.

    Interned, so two equal names are the same object (`is` compares them, as it did the enum this replaced).
    The class constants name the built-in algorithms for the code that must pick one without a request: the
    default for new keys and for records stored before keys had an algorithm.
    """

    __slots__ = ()
    _interned: ClassVar[dict[str, Algorithm]] = {}
    _interning: ClassVar[threading.Lock] = threading.Lock()

    AES_256_GCM: ClassVar[Algorithm]
    HMAC_SHA256: ClassVar[Algorithm]
    ED25519: ClassVar[Algorithm]
    ECDSA_P256_SHA256: ClassVar[Algorithm]

    def __new__(cls, name: str) -> Algorithm:
        known = cls._interned.get(name)
        if known is not None:
            return known
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not an algorithm name (upper case letters, digits and _, at most 64)")
        with cls._interning:
            return cls._interned.setdefault(name, super().__new__(cls, name))

    @property
    def value(self) -> str:
        """The name as a plain string (what stores write)."""
        return str.__str__(self)

    def __repr__(self) -> str:
        return f"Algorithm({self.value!r})"


Algorithm.AES_256_GCM = Algorithm("AES_256_GCM")
Algorithm.HMAC_SHA256 = Algorithm("HMAC_SHA256")
Algorithm.ED25519 = Algorithm("ED25519")
Algorithm.ECDSA_P256_SHA256 = Algorithm("ECDSA_P256_SHA256")


# -- the primitives ----------------------------------------------------------------------------------------


class Aead(Protocol):
    """Authenticated encryption with the caller's 96-bit nonce (cryptography's AESGCM, ChaCha20Poly1305 and
    AESGCMSIV all fit). The ciphertext format (domain/ciphertext.py) depends on both sizes.

    `encrypt` returns `ciphertext || tag (16 bytes)`; `decrypt` takes the same and raises
    cryptography.exceptions.InvalidTag when it does not authenticate.
    """

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None, /) -> bytes: ...


class StreamingAead(Protocol):
    """The segmented stream format (domain/stream_format.py) under one key version."""

    def encryptor(self, tenant_id: str, key_id: uuid.UUID, key_version: int, aad: bytes) -> StreamEncryptor: ...

    def decryptor(self, tenant_id: str, header: StreamHeader, aad: bytes) -> StreamDecryptor: ...


class Mac(Protocol):
    def compute(self, data: bytes) -> bytes: ...

    def verify(self, data: bytes, mac: bytes) -> bool:
        """Whether `mac` is the MAC of `data`, compared in constant time."""
        ...


class PublicKeySign(Protocol):
    def sign(self, message: bytes) -> bytes: ...


class PublicKeyVerify(Protocol):
    def verify(self, message: bytes, signature: bytes) -> bool: ...

    def public_key_pem(self) -> str:
        """The public key as PEM SubjectPublicKeyInfo (what GetPublicKey hands out)."""
        ...


_P = TypeVar("_P")


@dataclass(frozen=True, slots=True, eq=False)
class PrimitiveKind(Generic[_P]):
    """A kind of primitive a key manager may build; compared by identity, like a class."""

    name: str
    # What the primitive is for, as error messages say it: "<use> needs an X key".
    use: str

    def __repr__(self) -> str:
        return f"PrimitiveKind({self.name})"


AEAD: PrimitiveKind[Aead] = PrimitiveKind("AEAD", "encryption")
STREAMING_AEAD: PrimitiveKind[StreamingAead] = PrimitiveKind("STREAMING_AEAD", "stream encryption")
MAC: PrimitiveKind[Mac] = PrimitiveKind("MAC", "a MAC")
SIGNER: PrimitiveKind[PublicKeySign] = PrimitiveKind("SIGNER", "signing")
VERIFIER: PrimitiveKind[PublicKeyVerify] = PrimitiveKind("VERIFIER", "signature verification")


@dataclass(frozen=True, slots=True)
class Builder(Generic[_P]):
    """How one algorithm builds one kind of primitive from a version's material. Generic, so mypy checks at the
    declaration that `build` returns that kind (`Builder(AEAD, AESGCM)` type-checks; `Builder(MAC, AESGCM)`
    does not)."""

    kind: PrimitiveKind[_P]
    build: Callable[[bytes], _P]


@dataclass(frozen=True, slots=True)
class KeyManager:
    """Everything the service knows about one algorithm: its name, the key types that may use it, how to make
    its material, and the primitives it builds from that material (one builder per kind)."""

    algorithm: Algorithm
    # The key types that may use it. Only AES-256-GCM is open to master keys (the wrapping format is AES-GCM)
    # and to session keys (their material is handed out as an AES-256-GCM key); new algorithms are for data keys.
    key_types: frozenset[KeyType]
    # Fresh material from a CSPRNG: exactly MATERIAL_BYTES.
    new_material: Callable[[], bytes]
    builders: tuple[Builder[Any], ...]
    _by_kind: Mapping[PrimitiveKind[Any], Callable[[bytes], Any]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        kinds = [builder.kind for builder in self.builders]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"{self.algorithm.value}: one builder per primitive kind")
        if not self.key_types:
            raise ValueError(f"{self.algorithm.value}: no key type may use it")
        by_kind = MappingProxyType({builder.kind: builder.build for builder in self.builders})
        object.__setattr__(self, "_by_kind", by_kind)

    def builds(self, kind: PrimitiveKind[Any]) -> bool:
        return kind in self._by_kind

    def primitive(self, kind: PrimitiveKind[_P], material: bytes) -> _P:
        """The `kind` primitive over `material`. Raises ValueError when this algorithm builds none (the
        registry's `require` turns that case into AlgorithmMismatch before anything asks)."""
        build = self._by_kind.get(kind)
        if build is None:
            raise ValueError(f"{self.algorithm.value} builds no {kind.name}")
        built: _P = build(material)
        return built


class AlgorithmRegistry:
    """Algorithm name → key manager. Reads take no lock: a change replaces the whole mapping."""

    def __init__(self, managers: Iterable[KeyManager] = ()) -> None:
        self._managers: Mapping[Algorithm, KeyManager] = MappingProxyType({})
        self._changing = threading.Lock()
        for manager in managers:
            self.register(manager)

    def register(self, manager: KeyManager) -> None:
        """Add `manager`. Raises ValueError when its algorithm already has one (replacing a manager under
        stored keys would silently change what their material means)."""
        with self._changing:
            if manager.algorithm in self._managers:
                raise ValueError(f"{manager.algorithm.value} already has a key manager")
            self._managers = MappingProxyType({**self._managers, manager.algorithm: manager})

    def unregister(self, algorithm: Algorithm) -> None:
        """Remove the manager of `algorithm` (tests; keys of it become unusable, not deleted)."""
        with self._changing:
            self._managers = MappingProxyType({a: m for a, m in self._managers.items() if a != algorithm})

    def find(self, algorithm: Algorithm) -> KeyManager | None:
        return self._managers.get(algorithm)

    def algorithms(self) -> tuple[Algorithm, ...]:
        """Every registered algorithm, in registration order."""
        return tuple(self._managers)

    def building(self, kind: PrimitiveKind[Any]) -> tuple[Algorithm, ...]:
        """The registered algorithms that build `kind`."""
        return tuple(a for a, manager in self._managers.items() if manager.builds(kind))

    def open_to(self, key_type: KeyType) -> tuple[Algorithm, ...]:
        """The registered algorithms that `key_type` keys may use."""
        return tuple(a for a, manager in self._managers.items() if key_type in manager.key_types)

    def builds(self, algorithm: Algorithm, kind: PrimitiveKind[Any]) -> bool:
        manager = self._managers.get(algorithm)
        return manager is not None and manager.builds(kind)

    def require(self, key_id: str, algorithm: Algorithm, kind: PrimitiveKind[Any] | None, operation: str) -> KeyManager:
        """The manager of key `key_id`'s `algorithm`, checked to build `kind` (None: any manager will do).

        Raises AlgorithmMismatch (FAILED_PRECONDITION, ALGORITHM_MISMATCH) naming what the key is and what
        `operation` needs, also for an algorithm this server has no manager for (a key made by a newer server).
        """
        manager = self._managers.get(algorithm)
        if manager is not None and (kind is None or manager.builds(kind)):
            return manager
        able = self.algorithms() if kind is None else self.building(kind)
        needed = f"an {' or '.join(a.value for a in able)} key" if able else "an algorithm this server does not have"
        has = algorithm.value if manager is not None else f"{algorithm.value} (not supported by this server)"
        raise AlgorithmMismatch(key_id, has, operation, needed)
