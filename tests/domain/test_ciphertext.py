"""The v1 ciphertext format: a known-answer vector, bindings and parsing bounds."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given
from hypothesis import strategies as st

from crypto_server.domain import ciphertext as codec
from crypto_server.domain.errors import DecryptionFailed

VECTORS = json.loads((Path(__file__).parent.parent / "vectors" / "ciphertext_v1.json").read_text())


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_known_answer_vectors_decrypt(vector: dict[str, str]) -> None:
    aead = AESGCM(bytes.fromhex(vector["key"]))
    sealed = bytes.fromhex(vector["ciphertext"])
    header = codec.read_header(sealed)
    assert header.key_id == uuid.UUID(vector["key_id"])
    assert header.key_version == int(vector["key_version"])
    assert codec.decrypt(aead, vector["tenant_id"], sealed, bytes.fromhex(vector["aad"])) == bytes.fromhex(
        vector["plaintext"]
    )


def test_layout_is_version_key_id_key_version_nonce_body_tag() -> None:
    key_id = uuid.uuid4()
    sealed = codec.encrypt(AESGCM(AESGCM.generate_key(256)), "t", key_id, 7, b"abc", b"")
    assert sealed[0] == 1
    assert sealed[1:17] == key_id.bytes
    assert sealed[17:21] == (7).to_bytes(4, "big")
    assert len(sealed) == codec.OVERHEAD_BYTES + 3


@given(tenant=st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), other=st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True))
def test_a_ciphertext_does_not_open_under_another_tenant(tenant: str, other: str) -> None:
    aead = AESGCM(bytes(32))
    sealed = codec.encrypt(aead, tenant, uuid.UUID(int=1), 1, b"payload", b"aad")
    if other == tenant:
        assert codec.decrypt(aead, other, sealed, b"aad") == b"payload"
    else:
        with pytest.raises(DecryptionFailed):
            codec.decrypt(aead, other, sealed, b"aad")


def test_tenant_and_aad_boundaries_cannot_be_shifted() -> None:
    # "ab" + aad "c" must not equal "a" + aad "bc": the tenant is length-prefixed.
    aead = AESGCM(bytes(32))
    sealed = codec.encrypt(aead, "ab", uuid.UUID(int=1), 1, b"p", b"c")
    with pytest.raises(DecryptionFailed):
        codec.decrypt(aead, "a", sealed, b"bc")


@pytest.mark.parametrize("length", range(codec.OVERHEAD_BYTES))
def test_too_short_to_hold_a_tag_is_rejected_before_parsing(length: int) -> None:
    with pytest.raises(DecryptionFailed):
        codec.read_header(b"\x01" * length)


def test_unknown_format_version_is_rejected() -> None:
    with pytest.raises(DecryptionFailed):
        codec.read_header(b"\x02" + b"\0" * 64)
