"""The client's envelope, migration, batch and session-key methods, and the messaging and socket helpers."""

from __future__ import annotations

import os
from datetime import timedelta

import grpc
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from crypto_client import (
    CryptoClient,
    DecryptionError,
    DecryptItem,
    EncryptItem,
    InvalidArgumentError,
    KeyExpiredError,
    KeyNotFoundError,
    MessageCipher,
    SessionKeys,
)
from crypto_client.messaging import message_aad
from crypto_client.sessions import new_attempt_id
from tests.client.conftest import MakeClient
from tests.conftest import ServerHandle


def test_generate_data_key_and_unwrap_it(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    data_key = crypto.generate_data_key(key.key_id, aad=b"file-1")
    assert data_key.plaintext is not None and len(data_key.plaintext) == 32
    assert crypto.decrypt(data_key.ciphertext, aad=b"file-1").plaintext == data_key.plaintext
    nonce = os.urandom(12)
    assert AESGCM(data_key.plaintext).decrypt(nonce, AESGCM(data_key.plaintext).encrypt(nonce, b"x", None), None)
    assert crypto.generate_data_key(key.key_id, without_plaintext=True).plaintext is None


def test_re_encrypt_after_rotation(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    old = crypto.encrypt(key.key_id, b"keep", aad=b"a").ciphertext
    crypto.rotate_key(key.key_id)
    moved = crypto.re_encrypt(old, aad=b"a")
    assert (moved.key_version, moved.source_key_version) == (2, 1)
    assert crypto.decrypt(moved.ciphertext, aad=b"a").plaintext == b"keep"


def test_batches_return_one_typed_result_per_item(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    key = crypto.create_key()
    sealed = crypto.batch_encrypt(
        [EncryptItem(key.key_id, b"one"), EncryptItem("nope", b"two"), EncryptItem(key.key_id, b"three", aad=b"x")]
    )
    assert isinstance(sealed[1], InvalidArgumentError) and sealed[1].field == "key_id"
    assert sealed[1].code == grpc.StatusCode.INVALID_ARGUMENT
    first, third = sealed[0], sealed[2]
    assert not isinstance(first, Exception) and not isinstance(third, Exception)
    opened = crypto.batch_decrypt(
        [
            DecryptItem(first.ciphertext),
            DecryptItem(third.ciphertext),  # wrong aad
            DecryptItem(third.ciphertext, aad=b"x", key_id="00000000-0000-4000-8000-000000000000"),
        ]
    )
    assert not isinstance(opened[0], Exception) and opened[0].plaintext == b"one"
    assert isinstance(opened[1], DecryptionError)
    assert isinstance(opened[2], KeyNotFoundError)


def test_session_keys(faulty_server: ServerHandle, make_client: MakeClient) -> None:
    crypto = make_client(faulty_server.address)
    session = crypto.generate_session_key(expire_after=timedelta(minutes=30), labels={"room": "r1"})
    assert len(session.key_material) == 32
    fetched = crypto.get_session_key(session.key.key_id)
    assert fetched.key_material == session.key_material and fetched.key_version == 1
    faulty_server.clock.advance(timedelta(minutes=30))
    with pytest.raises(KeyExpiredError):
        crypto.get_session_key(session.key.key_id)


def test_message_cipher_binds_content_to_its_conversation_and_message(faulty_server: ServerHandle) -> None:
    with CryptoClient(faulty_server.address, "acme") as crypto:
        messages = MessageCipher(crypto, crypto.create_key().key_id)
        sealed = messages.encrypt("conv-1", "msg-1", b"hello")
        assert messages.decrypt("conv-1", "msg-1", sealed) == b"hello"
        for conversation, message in (("conv-2", "msg-1"), ("conv-1", "msg-2")):
            with pytest.raises(DecryptionError):
                messages.decrypt(conversation, message, sealed)
        history = [(f"m{i}", messages.encrypt("conv-1", f"m{i}", b"text %d" % i)) for i in range(20)]
        history[5] = ("m5", history[6][1])  # a ciphertext moved onto another message
        contents = messages.decrypt_history("conv-1", history)
        assert isinstance(contents[5], DecryptionError)
        assert [c for i, c in enumerate(contents) if i != 5] == [b"text %d" % i for i in range(20) if i != 5]


def test_message_aad_fields_cannot_shift() -> None:
    assert message_aad("t", "ab", "c") != message_aad("t", "a", "bc")
    with pytest.raises(ValueError):
        message_aad("t", "", "c")


def test_session_keys_helper_serves_a_room_and_caches_material(faulty_server: ServerHandle) -> None:
    with CryptoClient(faulty_server.address, "acme") as caller, CryptoClient(faulty_server.address, "acme") as other:
        attempt = new_attempt_id()
        opened = SessionKeys(caller, lifetime=timedelta(hours=1)).open("room-7", attempt_id=attempt)
        again = SessionKeys(caller, lifetime=timedelta(hours=1)).open("room-7", attempt_id=attempt)
        assert again.key.key_id == opened.key.key_id, "a repeated open with the same attempt id is one key"
        assert opened.key.labels == {"room": "room-7"}
        participant = SessionKeys(other, clock=faulty_server.clock.now)
        assert participant.fetch(opened.key.key_id).key_material == opened.key_material
        assert participant.fetch(opened.key.key_id).key_material == opened.key_material
        assert other.stats().calls == 1, "the second fetch came from memory"


@pytest.mark.parametrize("guessable", ["a1", "room-7:1", "x" * 21, "call id with spaces and enough length"])
def test_session_keys_helper_refuses_guessable_attempt_ids(faulty_server: ServerHandle, guessable: str) -> None:
    with CryptoClient(faulty_server.address, "acme") as caller, pytest.raises(ValueError, match="unguessable"):
        SessionKeys(caller).open("room-7", attempt_id=guessable)


def test_session_keys_helper_opens_distinct_keys_without_an_attempt_id(faulty_server: ServerHandle) -> None:
    with CryptoClient(faulty_server.address, "acme") as caller:
        sessions = SessionKeys(caller)
        assert sessions.open("room-7").key.key_id != sessions.open("room-7").key.key_id
