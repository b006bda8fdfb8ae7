"""Streaming encryption end to end: FileCipher over the streaming RPCs, a 256 MiB stream with flat server memory."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import random
from pathlib import Path

import grpc
import pytest

from crypto_client import CryptoClient, DecryptionError, FileCipher, KeyDisabledError
from crypto_client.v1 import crypto_service_pb2_grpc
from tests.conftest import Launch, ServerHandle

MIB = 1024 * 1024


class PatternReader(io.RawIOBase):
    """`size` bytes of a repeating random block, generated as read (no file of that size needed)."""

    def __init__(self, size: int, seed: int = 7) -> None:
        self._left = size
        self._block = random.Random(seed).randbytes(MIB + 7)
        self._offset = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        size = min(self._left if size < 0 else size, self._left)
        out = bytearray()
        while len(out) < size:
            take = min(size - len(out), len(self._block) - self._offset)
            out += self._block[self._offset : self._offset + take]
            self._offset = (self._offset + take) % len(self._block)
        self._left -= size
        return bytes(out)


class HashingWriter(io.RawIOBase):
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def _digest_of(reader: PatternReader) -> str:
    digest = hashlib.sha256()
    while chunk := reader.read(MIB):
        digest.update(chunk)
    return digest.hexdigest()


def test_file_cipher_round_trip_and_progress(faulty_server: ServerHandle, tmp_path: Path) -> None:
    with CryptoClient(faulty_server.address, "acme") as crypto:
        files = FileCipher(crypto, crypto.create_key().key_id, chunk_bytes=64 * 1024)
        source = tmp_path / "photo.jpg"
        source.write_bytes(os.urandom(3 * MIB + 17))
        seen: list[int] = []
        files.encrypt_file(source, tmp_path / "photo.enc", aad=b"media-1", progress=seen.append)
        assert seen[-1] == source.stat().st_size and seen == sorted(seen)
        files.decrypt_file(tmp_path / "photo.enc", tmp_path / "photo.out", aad=b"media-1")
        assert (tmp_path / "photo.out").read_bytes() == source.read_bytes()


def test_a_damaged_file_leaves_no_partial_plaintext(faulty_server: ServerHandle, tmp_path: Path) -> None:
    with CryptoClient(faulty_server.address, "acme") as crypto:
        files = FileCipher(crypto, crypto.create_key().key_id)
        source = tmp_path / "doc"
        source.write_bytes(os.urandom(2 * MIB))
        files.encrypt_file(source, tmp_path / "doc.enc")
        sealed = (tmp_path / "doc.enc").read_bytes()
        (tmp_path / "doc.enc").write_bytes(sealed[: len(sealed) // 2])
        with pytest.raises(DecryptionError):
            files.decrypt_file(tmp_path / "doc.enc", tmp_path / "doc.out")
        assert not (tmp_path / "doc.out").exists()
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".doc.out")] == []


def test_streams_respect_key_state_and_tenant(faulty_server: ServerHandle) -> None:
    with CryptoClient(faulty_server.address, "acme") as crypto, CryptoClient(faulty_server.address, "other") as other:
        key_id = crypto.create_key().key_id
        sealed = b"".join(crypto.encrypt_stream(key_id, [b"x" * 1000]))
        with pytest.raises(DecryptionError):
            b"".join(other.decrypt_stream([sealed]))
        crypto.disable_key(key_id)
        with pytest.raises(KeyDisabledError):
            b"".join(crypto.decrypt_stream([sealed]))


def test_a_stream_with_no_message_is_invalid_argument(faulty_server: ServerHandle) -> None:
    stub = crypto_service_pb2_grpc.CryptoServiceStub(faulty_server.channel)
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.EncryptStream(iter(())))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_256_mib_stream_round_trips_with_flat_server_memory(launch: Launch, tmp_path: Path) -> None:
    server = launch(CRYPTO_ROOT_KEY=base64.b64encode(os.urandom(32)).decode())
    with CryptoClient(server.address, "acme") as crypto:
        files = FileCipher(crypto, crypto.create_key().key_id)
        peaks = {}
        for size in (16 * MIB, 256 * MIB):
            sealed_path = tmp_path / f"sealed-{size}"
            with sealed_path.open("wb") as sealed:
                files.encrypt(PatternReader(size), sealed)
            sink = HashingWriter()
            with sealed_path.open("rb") as sealed:
                files.decrypt(sealed, sink)
            assert sink.size == size
            assert sink.digest.hexdigest() == _digest_of(PatternReader(size))
            peaks[size] = server.peak_rss_bytes()
            sealed_path.unlink()
    assert peaks[256 * MIB] - peaks[16 * MIB] < 50 * MIB, f"server memory grew with the stream: {peaks}"


@pytest.mark.parametrize("damage", ["reorder", "drop", "duplicate", "truncate"])
def test_damaged_segments_are_detected_over_grpc(faulty_server: ServerHandle, damage: str) -> None:
    with CryptoClient(faulty_server.address, "acme") as crypto:
        key_id = crypto.create_key().key_id
        plaintext = os.urandom(5 * 64 * 1024 + 999)
        sealed = b"".join(crypto.encrypt_stream(key_id, [plaintext], aad=b"a"))
        header, body = sealed[:64], sealed[64:]
        size = 64 * 1024 + 16
        segments = [body[i : i + size] for i in range(0, len(body), size)]
        assert len(segments) == 6
        damaged = {
            "reorder": [segments[1], segments[0], *segments[2:]],
            "drop": [segments[0], *segments[2:]],
            "duplicate": [segments[0], *segments],
            "truncate": segments[:-1],
        }[damage]
        assert b"".join(crypto.decrypt_stream([header, *segments], aad=b"a")) == plaintext
        with pytest.raises(DecryptionError) as caught:
            b"".join(crypto.decrypt_stream([header, *damaged], aad=b"a"))
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details == "ciphertext could not be decrypted"
