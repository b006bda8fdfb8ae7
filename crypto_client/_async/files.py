"""FileCipher: encrypt and decrypt files or streams of any size, with bounded memory.

Through the service's streaming RPCs (EncryptStream / DecryptStream), not by
envelope encryption with a data key: the key never leaves the service, so a
compromised media worker holds no key it could reuse, and disabling or
rotating the key takes effect for files too. The cost is that every byte
travels to the service and back; memory stays bounded on both sides (one chunk
here, two segments there), whatever the file's size.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from crypto_client._async.client import AsyncCryptoClient
from crypto_client._atomic import atomic_file
from crypto_client._synchronization import AsyncBlockingCalls
from crypto_client.models import Progress


class AsyncFileCipher:
    """Files and streams under one AES key of one tenant (`tenant_id`, default: the client's)."""

    def __init__(
        self,
        client: AsyncCryptoClient,
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

    async def _read(self, source: BinaryIO, progress: Progress | None) -> AsyncIterator[bytes]:
        done = 0
        while chunk := await AsyncBlockingCalls.run(source.read, self._chunk_bytes):
            done += len(chunk)
            yield chunk
            if progress is not None:
                progress(done)

    async def encrypt(
        self, source: BinaryIO, destination: BinaryIO, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Encrypt everything `source` yields into `destination`; the ciphertext bytes written.
        `progress(n)` is called with the plaintext bytes read so far."""
        written = 0
        chunks = self._read(source, progress)
        async for chunk in self._client.encrypt_stream(self._key_id, chunks, aad=aad, tenant_id=self._tenant_id):
            await AsyncBlockingCalls.run(destination.write, chunk)
            written += len(chunk)
        return written

    async def decrypt(
        self, source: BinaryIO, destination: BinaryIO, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Decrypt into `destination`; the plaintext bytes written. If this raises, what was written
        is not to be trusted (truncation shows only at the end): decrypt_file handles that for paths.
        `progress(n)` is called with the ciphertext bytes read so far."""
        written = 0
        chunks = self._read(source, progress)
        async for chunk in self._client.decrypt_stream(chunks, aad=aad, key_id=self._key_id, tenant_id=self._tenant_id):
            await AsyncBlockingCalls.run(destination.write, chunk)
            written += len(chunk)
        return written

    async def encrypt_file(
        self, source: Path, destination: Path, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Encrypt a file into `destination`, which appears only once complete."""
        with source.open("rb") as reader, atomic_file(destination) as writer:
            return await self.encrypt(reader, writer, aad=aad, progress=progress)

    async def decrypt_file(
        self, source: Path, destination: Path, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Decrypt into a temporary file beside `destination`, renamed into place only when the whole
        stream verified: a damaged file never leaves a partial plaintext behind."""
        with source.open("rb") as reader, atomic_file(destination) as writer:
            return await self.decrypt(reader, writer, aad=aad, progress=progress)
