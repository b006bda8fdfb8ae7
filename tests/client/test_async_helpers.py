"""The asyncio helpers (generated twins of the blocking ones) and the asyncio streams, against a real server."""

from __future__ import annotations

import asyncio
import io
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import jwt
import pytest

from crypto_client import (
    Algorithm,
    AsyncBlindIndex,
    AsyncCryptoClient,
    AsyncEnvelopeCipher,
    AsyncFileCipher,
    AsyncMessageCipher,
    AsyncSessionKeys,
    AsyncTokenSigner,
    DataKeyCache,
    DecryptionError,
    InvalidTokenError,
    KeyDisabledError,
)
from crypto_client.sessions import new_attempt_id
from tests.client.faults import FaultInjector
from tests.conftest import ServerHandle

_T = TypeVar("_T")


def _run(
    server: ServerHandle, scenario: Callable[[AsyncCryptoClient], Awaitable[_T]], tenant: str | None = "acme"
) -> _T:
    async def main() -> _T:
        async with AsyncCryptoClient(server.address, tenant) as crypto:
            return await scenario(crypto)

    return asyncio.run(main())


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


def test_async_streams_round_trip_and_detect_damage(faulty_server: ServerHandle) -> None:
    async def scenario(crypto: AsyncCryptoClient) -> None:
        key_id = (await crypto.create_key()).key_id
        plaintext = os.urandom(3 * 64 * 1024 + 5)
        sealed = b"".join([c async for c in crypto.encrypt_stream(key_id, _chunks(plaintext[:1000], plaintext[1000:]))])
        assert b"".join([c async for c in crypto.decrypt_stream(_chunks(sealed))]) == plaintext
        with pytest.raises(DecryptionError):
            b"".join([c async for c in crypto.decrypt_stream(_chunks(sealed[:-100]))])
        await crypto.disable_key(key_id)
        with pytest.raises(KeyDisabledError):
            b"".join([c async for c in crypto.decrypt_stream(_chunks(sealed))])
        assert crypto.stats().breaker_state == "closed"

    _run(faulty_server, scenario)


def test_async_file_cipher_round_trip_with_progress(faulty_server: ServerHandle, tmp_path: Path) -> None:
    source = tmp_path / "video.mp4"
    source.write_bytes(os.urandom(2 * 1024 * 1024 + 3))
    seen: list[int] = []

    async def scenario(crypto: AsyncCryptoClient) -> None:
        files = AsyncFileCipher(crypto, (await crypto.create_key()).key_id, chunk_bytes=64 * 1024)
        await files.encrypt_file(source, tmp_path / "video.enc", aad=b"m", progress=seen.append)
        await files.decrypt_file(tmp_path / "video.enc", tmp_path / "video.out", aad=b"m")
        sealed = (tmp_path / "video.enc").read_bytes()
        with pytest.raises(DecryptionError):
            await files.decrypt(io.BytesIO(sealed[: len(sealed) // 2]), io.BytesIO(), aad=b"m")

    _run(faulty_server, scenario)
    assert seen[-1] == source.stat().st_size and seen == sorted(seen)
    assert (tmp_path / "video.out").read_bytes() == source.read_bytes()


def test_async_envelope_cipher_reuses_data_keys_within_limits(
    faulty_server: ServerHandle, faults: FaultInjector
) -> None:
    async def scenario(crypto: AsyncCryptoClient) -> list[bytes]:
        cipher = AsyncEnvelopeCipher(crypto, (await crypto.create_key()).key_id, cache=DataKeyCache(max_messages=2))
        sealed = [await cipher.encrypt(b"m%d" % i, aad=b"a") for i in range(3)]
        with pytest.raises(DecryptionError):
            await cipher.decrypt(sealed[0], aad=b"b")
        return [await cipher.decrypt(s, aad=b"a") for s in sealed]

    assert _run(faulty_server, scenario) == [b"m0", b"m1", b"m2"]
    assert faults.attempts["GenerateDataKey"] == 2


def test_async_blind_index_and_message_cipher_on_a_client_without_a_default_tenant(
    faulty_server: ServerHandle,
) -> None:
    async def scenario(crypto: AsyncCryptoClient) -> None:
        mac_key = (await crypto.create_key(algorithm=Algorithm.HMAC_SHA256, tenant_id="acme")).key_id
        index = AsyncBlindIndex(crypto, mac_key, tenant_id="acme")
        token = await index.token("Alice")
        await crypto.rotate_key(mac_key, tenant_id="acme")
        assert token in await index.query_tokens("alice")
        with pytest.raises(ValueError, match="tenant_id"):
            AsyncMessageCipher(crypto, mac_key)
        messages = AsyncMessageCipher(crypto, (await crypto.create_key(tenant_id="acme")).key_id, tenant_id="acme")
        sealed = await messages.encrypt("conv", "m1", b"hi")
        assert await messages.decrypt("conv", "m1", sealed) == b"hi"
        history = await messages.decrypt_history("conv", [("m1", sealed), ("m2", sealed)])
        assert history[0] == b"hi"
        assert isinstance(history[1], DecryptionError), "moved onto another message id"

    _run(faulty_server, scenario, tenant=None)


def test_async_token_signer_signs_verifies_and_caches_public_keys(faulty_server: ServerHandle) -> None:
    async def scenario(crypto: AsyncCryptoClient) -> None:
        key_id = (await crypto.create_key(algorithm=Algorithm.ED25519)).key_id
        signer = AsyncTokenSigner(crypto, key_id, audience="gateway")
        token = await signer.sign({"sub": "user-1", "exp": int(time.time()) + 60})
        assert jwt.get_unverified_header(token)["kid"] == f"{key_id}/1"
        assert (await signer.verify(token))["sub"] == "user-1"
        calls = crypto.stats().calls
        await asyncio.gather(*(signer.verify(token) for _ in range(10)))
        assert crypto.stats().calls == calls, "verification uses the cached public key"
        forged = f"{token.split('.')[0]}.{jwt.utils.base64url_encode(b'{}').decode()}.{token.split('.')[2]}"
        with pytest.raises(InvalidTokenError):
            await signer.verify(forged)

    _run(faulty_server, scenario)


def test_async_token_signer_fetches_an_unknown_version_once_for_concurrent_verifications(
    faulty_server: ServerHandle, faults: FaultInjector
) -> None:
    async def scenario(crypto: AsyncCryptoClient) -> None:
        key_id = (await crypto.create_key(algorithm=Algorithm.ED25519)).key_id
        token = await AsyncTokenSigner(crypto, key_id).sign({"sub": "u"})
        verifier = AsyncTokenSigner(crypto, key_id)
        before = faults.attempts["GetPublicKey"]
        results = await asyncio.gather(*(verifier.verify(token) for _ in range(20)))
        assert all(claims["sub"] == "u" for claims in results)
        assert faults.attempts["GetPublicKey"] - before == 1, "one fetch, the others waited for it"

    _run(faulty_server, scenario)


def test_async_session_keys_open_once_per_attempt_and_fetch_from_memory(faulty_server: ServerHandle) -> None:
    async def scenario(crypto: AsyncCryptoClient) -> None:
        sessions = AsyncSessionKeys(crypto, lifetime=timedelta(hours=1), clock=faulty_server.clock.now)
        attempt = new_attempt_id()
        opened = await sessions.open("room-1", attempt_id=attempt)
        assert (await sessions.open("room-1", attempt_id=attempt)).key.key_id == opened.key.key_id
        calls = crypto.stats().calls
        assert (await sessions.fetch(opened.key.key_id)).key_material == opened.key_material
        assert crypto.stats().calls == calls

    _run(faulty_server, scenario)
