"""Acceptance 7: random plaintext and aad round-trip over real gRPC."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crypto_client.v1 import resources_pb2
from tests.conftest import ServerHandle


@pytest.fixture
def backend() -> str:
    """One store: sealing and opening random bytes never reach the store, which only holds the key created per
    example (written and read back as written on every store: tests/storage/test_contract.py); the round trip on
    every backend, HSM root key included, is tests/transport/test_round_trip.py."""
    return "embedded"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    plaintext=st.binary(max_size=4096),
    aad=st.binary(max_size=512),
    key_type=st.sampled_from([resources_pb2.KEY_TYPE_DATA, resources_pb2.KEY_TYPE_SESSION]),
)
def test_random_plaintext_and_aad_round_trip(server: ServerHandle, plaintext: bytes, aad: bytes, key_type: int) -> None:
    key = server.create_key("prop-tenant", key_type)
    sealed = server.encrypt("prop-tenant", key.key_id, plaintext, aad=aad)
    opened = server.decrypt("prop-tenant", sealed.ciphertext, aad=aad, key_id=key.key_id)
    assert opened.plaintext == plaintext
    assert opened.key_version == sealed.key_version == 1
