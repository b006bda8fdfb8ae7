"""Acceptance 3: every way of damaging a ciphertext gives the same INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import pytest

from crypto_server.domain.errors import DecryptionFailed
from tests.conftest import ServerHandle, error_info

PLAINTEXT = b"attack at dawn"
AAD = b"conversation-42"


@pytest.fixture
def backend() -> str:
    """One store: a damaged ciphertext is refused by the ciphertext codec and AES-GCM, whatever store holds its
    key; the store's only part, a key id that names no key (or another key) when a bit flips, is a lookup that
    answers None or that key on every store (tests/storage/test_contract.py)."""
    return "embedded"


@pytest.fixture
def sealed(server: ServerHandle) -> tuple[ServerHandle, bytes]:
    key = server.create_key("t1")
    server.create_key("t1")  # a second key, so a key id bit flip can land on nothing or on another key
    return server, server.encrypt("t1", key.key_id, PLAINTEXT, aad=AAD).ciphertext


def _assert_opaque_failure(server: ServerHandle, ciphertext: bytes, aad: bytes = AAD) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        server.decrypt("t1", ciphertext, aad=aad)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == DecryptionFailed.MESSAGE
    info = error_info(caught.value)
    assert info.reason == "ERROR_REASON_DECRYPTION_FAILED"
    assert dict(info.metadata) == {}


def test_flipping_any_single_bit_is_detected(sealed: tuple[ServerHandle, bytes]) -> None:
    server, ciphertext = sealed
    for bit in range(len(ciphertext) * 8):
        damaged = bytearray(ciphertext)
        damaged[bit // 8] ^= 1 << (bit % 8)
        _assert_opaque_failure(server, bytes(damaged))


def test_other_aad_is_detected(sealed: tuple[ServerHandle, bytes]) -> None:
    server, ciphertext = sealed
    for aad in (b"", b"conversation-43", AAD + b"\0", AAD[:-1]):
        _assert_opaque_failure(server, ciphertext, aad)


def test_truncation_at_every_length_is_detected(sealed: tuple[ServerHandle, bytes]) -> None:
    server, ciphertext = sealed
    for length in range(len(ciphertext)):
        _assert_opaque_failure(server, ciphertext[:length])


def test_extension_is_detected(sealed: tuple[ServerHandle, bytes]) -> None:
    server, ciphertext = sealed
    for suffix in (b"\0", b"\xff" * 16, ciphertext):
        _assert_opaque_failure(server, ciphertext + suffix)


def test_garbage_of_any_shape_is_the_same_failure(sealed: tuple[ServerHandle, bytes]) -> None:
    server, ciphertext = sealed
    oversized = b"\x01" + b"\0" * (server.settings.max_plaintext_bytes + 100)
    for garbage in (b"\x02" + ciphertext[1:], b"\x00" * 64, b"\xff" * 200, oversized):
        _assert_opaque_failure(server, garbage)


def test_the_intact_ciphertext_still_decrypts(sealed: tuple[ServerHandle, bytes]) -> None:
    server, ciphertext = sealed
    assert server.decrypt("t1", ciphertext, aad=AAD).plaintext == PLAINTEXT
