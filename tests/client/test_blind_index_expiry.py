"""BlindIndex across version expiry: expired versions compute no new tokens, unexpired ones are still queried."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from crypto_client import Algorithm, BlindIndex, CryptoClient
from crypto_client.errors import KeyExpiredError
from tests.conftest import ServerHandle


@pytest.fixture
def crypto(faulty_server: ServerHandle) -> Iterator[CryptoClient]:
    with CryptoClient(faulty_server.address, "acme") as client:
        yield client


def test_queries_skip_expired_versions_and_new_tokens_need_an_unexpired_primary(
    faulty_server: ServerHandle, crypto: CryptoClient
) -> None:
    key_id = crypto.create_key(algorithm=Algorithm.HMAC_SHA256, expire_after=timedelta(hours=2)).key_id
    index = BlindIndex(crypto, key_id)
    old_token = index.token("term")
    faulty_server.clock.advance(timedelta(hours=1))
    crypto.rotate_key(key_id)
    new_token = index.token("term")
    assert index.query_tokens("term") == [new_token, old_token]

    faulty_server.clock.advance(timedelta(hours=1, minutes=30))  # version 1 has expired, version 2 has not
    assert index.query_tokens("term") == [new_token], "an expired version is not asked for a MAC"
    assert index.token("term") == new_token

    faulty_server.clock.advance(timedelta(hours=1))  # both expired
    with pytest.raises(KeyExpiredError):
        index.token("term")
