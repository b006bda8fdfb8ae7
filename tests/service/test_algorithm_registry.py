"""An algorithm defined and registered here, in the test, works end to end with no edit to the server.

The toy is ChaCha20-Poly1305 (from `cryptography`): an AEAD with the 96-bit nonce and 16-byte tag the
ciphertext format needs, so data keys of it encrypt, decrypt, rotate and re-encrypt, and it is refused for
everything it builds no primitive for (MACs, signatures, streams) and for key types it is not open to.
The proto enum cannot name it (that would be one line in resources.proto, docs/development.md), so keys of
it are created through the service; the gRPC test then uses such a key over the wire, on every store.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from crypto_client.v1 import crypto_service_pb2 as crypto_pb
from crypto_client.v1 import key_service_pb2 as key_pb
from crypto_client.v1 import resources_pb2
from crypto_server.domain import ciphertext as codec
from crypto_server.domain.algorithms import (
    AEAD,
    MAC,
    Algorithm,
    AlgorithmRegistry,
    Builder,
    KeyManager,
    random_material,
)
from crypto_server.domain.errors import AlgorithmMismatch, DecryptionFailed, InvalidArgument
from crypto_server.domain.key_managers import ALGORITHMS
from crypto_server.domain.keys import KeyType
from crypto_server.service.crypto_operations import CryptoOperations
from crypto_server.service.key_lifecycle import KeyLifecycle
from crypto_server.service.keyring import Keyring
from crypto_server.service.macs_and_signatures import MacsAndSignatures
from crypto_server.storage.port import LocalInvalidation
from crypto_server.storage.sqlite import SqliteKeyStore
from crypto_server.transport.mapping import algorithm_from_proto, algorithm_to_proto
from tests.conftest import FakeClock, ServerHandle, expect_error

# -- the toy algorithm: all of it ---------------------------------------------------------------------------

TOY = Algorithm("TOY_CHACHA20_POLY1305")


TOY_MANAGER = KeyManager(
    algorithm=TOY,
    key_types=frozenset({KeyType.DATA}),
    new_material=random_material,
    builders=(Builder(AEAD, ChaCha20Poly1305),),
)


@pytest.fixture
def toy_algorithm() -> Iterator[Algorithm]:
    """TOY registered with the server's registry for one test; unregistering restores the registry."""
    before = ALGORITHMS.algorithms()
    ALGORITHMS.register(TOY_MANAGER)
    try:
        yield TOY
    finally:
        ALGORITHMS.unregister(TOY)
        assert ALGORITHMS.algorithms() == before


# -- the service, over a real store ---------------------------------------------------------------------------


class Service:
    def __init__(self, data_dir: Path) -> None:
        self.clock = FakeClock()
        self.store = SqliteKeyStore(data_dir)
        self.keyring = Keyring(self.store, AESGCM(os.urandom(32)), ttl_s=300, max_keys=100)
        self.lifecycle = KeyLifecycle(
            self.store,
            self.keyring,
            self.clock,
            LocalInvalidation(self.keyring),
            schedule=self.store,
            request_key_id_secret=b"s" * 32,
        )
        self.operations = CryptoOperations(self.keyring, self.clock)
        self.macs = MacsAndSignatures(self.keyring, self.clock)

    def material(self, key_id: str, version: int) -> bytes:
        return self.keyring.material(self.keyring.get("t1", key_id), version)


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    made = Service(tmp_path)
    yield made
    made.store.close()


def test_a_registered_algorithm_encrypts_decrypts_and_rotates(service: Service, toy_algorithm: Algorithm) -> None:
    key = service.lifecycle.create_key("t1", KeyType.DATA, algorithm=toy_algorithm)
    assert key.algorithm is toy_algorithm
    first = service.operations.encrypt("t1", key.key_id, b"secret", b"aad")
    assert service.operations.decrypt("t1", first.ciphertext, b"aad").plaintext == b"secret"

    # The toy's primitive made it, not AES-GCM: it opens with ChaCha20-Poly1305 over the version's material only.
    material = service.material(key.key_id, 1)
    assert codec.decrypt(ChaCha20Poly1305(material), "t1", first.ciphertext, b"aad") == b"secret"
    with pytest.raises(DecryptionFailed):
        codec.decrypt(AESGCM(material), "t1", first.ciphertext, b"aad")

    rotated = service.lifecycle.rotate_key("t1", key.key_id)
    assert rotated.primary_version == 2 and rotated.algorithm is toy_algorithm
    second = service.operations.encrypt("t1", key.key_id, b"later")
    assert second.key_version == 2
    assert service.operations.decrypt("t1", first.ciphertext, b"aad").key_version == 1
    assert service.operations.decrypt("t1", second.ciphertext).plaintext == b"later"
    moved = service.operations.re_encrypt("t1", first.ciphertext, b"aad")
    assert moved.encrypted.key_version == 2 and moved.source_key_version == 1


def test_a_registered_algorithm_is_refused_for_what_it_does_not_build(
    service: Service, toy_algorithm: Algorithm
) -> None:
    key_id = service.lifecycle.create_key("t1", KeyType.DATA, algorithm=toy_algorithm).key_id
    refused: list[Callable[[], object]] = [
        lambda: service.macs.compute_mac("t1", key_id, b"x"),
        lambda: service.macs.verify_mac("t1", key_id, b"x", b"m" * 32),
        lambda: service.macs.sign("t1", key_id, b"x"),
        lambda: service.macs.verify("t1", key_id, b"x", b"s"),
        lambda: service.macs.public_key("t1", key_id),
        lambda: service.operations.encrypt_stream("t1", key_id, b"", iter([b"x"])),
    ]
    for call in refused:
        with pytest.raises(AlgorithmMismatch) as caught:
            call()
        assert toy_algorithm.value in caught.value.message
    # Asking the keyring for the wrong kind directly is refused the same way: nothing builds a MAC from it.
    with pytest.raises(AlgorithmMismatch):
        service.keyring.mac(service.keyring.get("t1", key_id), 1)
    for key_type in (KeyType.MASTER, KeyType.SESSION):
        with pytest.raises(InvalidArgument, match="cannot use TOY_CHACHA20_POLY1305"):
            service.lifecycle.create_key("t2", key_type, algorithm=toy_algorithm)


def test_keys_of_an_unregistered_algorithm_are_refused_not_misused(service: Service) -> None:
    ALGORITHMS.register(TOY_MANAGER)
    try:
        key_id = service.lifecycle.create_key("t1", KeyType.DATA, algorithm=TOY).key_id
        sealed = service.operations.encrypt("t1", key_id, b"secret").ciphertext
    finally:
        ALGORITHMS.unregister(TOY)
    service.keyring.forget_all()

    with pytest.raises(InvalidArgument, match="not supported by this server"):
        service.lifecycle.create_key("t1", KeyType.DATA, algorithm=TOY)
    with pytest.raises(AlgorithmMismatch, match="not supported by this server"):
        service.operations.encrypt("t1", key_id, b"x")
    with pytest.raises(AlgorithmMismatch):
        service.lifecycle.rotate_key("t1", key_id)
    # Never opened with another algorithm's primitive: to the caller it is a ciphertext that does not open.
    with pytest.raises(DecryptionFailed):
        service.operations.decrypt("t1", sealed)


# -- the registry itself --------------------------------------------------------------------------------------


def test_an_algorithm_registers_once() -> None:
    registry = AlgorithmRegistry((TOY_MANAGER,))
    with pytest.raises(ValueError, match="already has a key manager"):
        registry.register(TOY_MANAGER)
    assert registry.building(AEAD) == (TOY,) and registry.building(MAC) == ()
    registry.unregister(TOY)
    assert registry.find(TOY) is None


def test_a_manager_builds_each_kind_once() -> None:
    with pytest.raises(ValueError, match="one builder per primitive kind"):
        KeyManager(TOY, frozenset({KeyType.DATA}), random_material, (Builder(AEAD, AESGCM), Builder(AEAD, AESGCM)))


@pytest.mark.parametrize("name", ["", "aes", "AES-GCM", "A" * 65])
def test_an_algorithm_name_is_upper_case_letters_digits_and_underscores(name: str) -> None:
    with pytest.raises(ValueError, match="not an algorithm name"):
        Algorithm(name)


def test_an_algorithm_read_back_from_a_store_is_the_same_object() -> None:
    # Stores rebuild it from its stored string; `is` comparisons in the domain rely on that.
    assert Algorithm("HMAC_SHA256") is Algorithm.HMAC_SHA256
    assert Algorithm(Algorithm.ED25519.value).value == "ED25519"


def test_every_built_in_algorithm_has_its_proto_value_by_name() -> None:
    """Guards the one line a new algorithm needs beyond its module: its ALGORITHM_<name> enum value."""
    for algorithm in ALGORITHMS.algorithms():
        number = algorithm_to_proto(algorithm)
        assert number != resources_pb2.ALGORITHM_UNSPECIFIED, f"resources.proto has no ALGORITHM_{algorithm.value}"
        assert algorithm_from_proto(number) is algorithm


# -- over gRPC, on every store ------------------------------------------------------------------------------


def test_a_key_of_a_registered_algorithm_serves_over_grpc(server: ServerHandle, toy_algorithm: Algorithm) -> None:
    running = server.running
    lifecycle = KeyLifecycle(
        running.serving,
        running.keyring,
        server.clock,
        LocalInvalidation(running.keyring),
        schedule=running.store,
        request_key_id_secret=b"s" * 32,
    )
    key_id = lifecycle.create_key("t1", KeyType.DATA, algorithm=toy_algorithm).key_id
    running.keyring.forget_all()  # what follows reads the key back from the store, algorithm and all

    first = server.encrypt("t1", key_id, b"secret", b"aad")
    assert server.decrypt("t1", first.ciphertext, b"aad").plaintext == b"secret"
    rotated = server.keys.RotateKey(key_pb.RotateKeyRequest(tenant_id="t1", key_id=key_id)).key
    assert rotated.primary_version == 2
    # The API version in use cannot name it: listed as UNSPECIFIED, never as another algorithm.
    assert rotated.algorithm == resources_pb2.ALGORITHM_UNSPECIFIED
    assert server.encrypt("t1", key_id, b"later").key_version == 2
    assert server.decrypt("t1", first.ciphertext, b"aad").key_version == 1
    error = expect_error(
        lambda: server.crypto.ComputeMac(crypto_pb.ComputeMacRequest(tenant_id="t1", key_id=key_id, data=b"x")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "ERROR_REASON_ALGORITHM_MISMATCH",
    )
    assert toy_algorithm.value in (error.details() or "")
