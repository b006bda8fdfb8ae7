"""EnvelopeCipher: local AES-GCM under service-wrapped data keys, with the data-key cache off or within limits."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from crypto_client import CryptoClient, DataKeyCache, DecryptionError, EnvelopeCipher
from tests.client.faults import FaultInjector
from tests.conftest import ServerHandle, Ticks


@pytest.fixture
def crypto(faulty_server: ServerHandle) -> Iterator[CryptoClient]:
    with CryptoClient(faulty_server.address, "acme") as client:
        yield client


def test_without_a_cache_every_message_gets_its_own_data_key(crypto: CryptoClient, faults: FaultInjector) -> None:
    cipher = EnvelopeCipher(crypto, crypto.create_key().key_id)
    sealed = [cipher.encrypt(b"message %d" % i, aad=b"ctx") for i in range(3)]
    assert faults.attempts["GenerateDataKey"] == 3
    assert [cipher.decrypt(s, aad=b"ctx") for s in sealed] == [b"message 0", b"message 1", b"message 2"]
    with pytest.raises(DecryptionError):
        cipher.decrypt(sealed[0], aad=b"other")


def test_the_cache_reuses_a_data_key_within_max_messages(crypto: CryptoClient, faults: FaultInjector) -> None:
    cipher = EnvelopeCipher(crypto, crypto.create_key().key_id, cache=DataKeyCache(max_messages=3))
    sealed = [cipher.encrypt(b"m%d" % i) for i in range(7)]
    assert faults.attempts["GenerateDataKey"] == 3  # 3 + 3 + 1 messages
    assert [cipher.decrypt(s) for s in sealed] == [b"m%d" % i for i in range(7)]
    assert faults.attempts["Decrypt"] == 3, "each wrapped data key was unwrapped once"


def test_the_cache_respects_max_age_and_max_bytes(crypto: CryptoClient, faults: FaultInjector) -> None:
    ticks = Ticks()
    cipher = EnvelopeCipher(
        crypto, crypto.create_key().key_id, cache=DataKeyCache(max_age_s=10, max_bytes=100, clock=ticks)
    )
    cipher.encrypt(b"x" * 60)
    cipher.encrypt(b"x" * 40)
    assert faults.attempts["GenerateDataKey"] == 1
    cipher.encrypt(b"x")  # 101 bytes would exceed max_bytes
    assert faults.attempts["GenerateDataKey"] == 2
    ticks.now += 10
    cipher.encrypt(b"x")
    assert faults.attempts["GenerateDataKey"] == 3


def test_cache_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        DataKeyCache(max_messages=0)
