# Generated from crypto_client/_async/files.py by scripts/unasync.py (make unasync): do not edit.
"""FileCipher: encrypt and decrypt files or streams of any size, with bounded memory.

Through the service's streaming RPCs (EncryptStream / DecryptStream), not by
envelope encryption with a data key: the key never leaves the service, so a
compromised media worker holds no key it could reuse, and disabling or
rotating the key takes effect for files too. The cost is that every byte
travels to the service and back; memory stays bounded on both sides (one chunk
here, two segments there), whatever the file's size.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from crypto_client._atomic import atomic_file
from crypto_client._sync.client import CryptoClient
from crypto_client._synchronization import BlockingCalls
from crypto_client.models import Progress


class FileCipher:
    """Files and streams under one AES key of one tenant (`tenant_id`, default: the client's)."""

    def __init__(
        self,
        client: CryptoClient,
        key_id: str,
        *,
        chunk_bytes: int = 1024 * 1024,
        tenant_id: str | None = None,
    ) -> None:
        if not 4096 <= chunk_bytes <= 8 * 1024 * 1024:
            raise ValueError("chunk_bytes must be between 4 KiB and 8 MiB")
        self._client = client
        self._key_id = key_id
        self._chunk_bytes = chunk_bytes
        self._tenant_id = tenant_id

    def _read(self, source: BinaryIO, progress: Progress | None) -> Iterator[bytes]:
        done = 0
        while chunk := BlockingCalls.run(source.read, self._chunk_bytes):
            done += len(chunk)
            yield chunk
            if progress is not None:
                progress(done)

    def encrypt(
        self, source: BinaryIO, destination: BinaryIO, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Encrypt everything `source` yields into `destination`; the ciphertext bytes written.
        `progress(n)` is called with the plaintext bytes read so far."""
        written = 0
        chunks = self._read(source, progress)
        for chunk in self._client.encrypt_stream(self._key_id, chunks, aad=aad, tenant_id=self._tenant_id):
            BlockingCalls.run(destination.write, chunk)
            written += len(chunk)
        return written

    def decrypt(
        self, source: BinaryIO, destination: BinaryIO, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Decrypt into `destination`; the plaintext bytes written. If this raises, what was written
        is not to be trusted (truncation shows only at the end): decrypt_file handles that for paths.
        `progress(n)` is called with the ciphertext bytes read so far."""
        written = 0
        chunks = self._read(source, progress)
        for chunk in self._client.decrypt_stream(chunks, aad=aad, key_id=self._key_id, tenant_id=self._tenant_id):
            BlockingCalls.run(destination.write, chunk)
            written += len(chunk)
        return written

    def encrypt_file(
        self, source: Path, destination: Path, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Encrypt a file into `destination`, which appears only once complete."""
        with source.open("rb") as reader, atomic_file(destination) as writer:
            return self.encrypt(reader, writer, aad=aad, progress=progress)

    def decrypt_file(
        self, source: Path, destination: Path, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Decrypt into a temporary file beside `destination`, renamed into place only when the whole
        stream verified: a damaged file never leaves a partial plaintext behind."""
        with source.open("rb") as reader, atomic_file(destination) as writer:
            return self.decrypt(reader, writer, aad=aad, progress=progress)
