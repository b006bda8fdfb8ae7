"""FileCipher: encrypt and decrypt files or streams of any size, with bounded memory.

Through the service's streaming RPCs (EncryptStream / DecryptStream), not by
envelope encryption with a data key: the key never leaves the service, so a
compromised media worker holds no key it could reuse, and disabling or
rotating the key takes effect for files too. The cost is that every byte
travels to the service and back; memory stays bounded on both sides (one chunk
here, two segments there), whatever the file's size.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from crypto_client.sync_client import CryptoClient

Progress = Callable[[int], None]


class FileCipher:
    def __init__(self, client: CryptoClient, key_id: str, *, chunk_bytes: int = 1024 * 1024) -> None:
        if not 4096 <= chunk_bytes <= 8 * 1024 * 1024:
            raise ValueError("chunk_bytes must be between 4 KiB and 8 MiB")
        self._client = client
        self._key_id = key_id
        self._chunk_bytes = chunk_bytes

    def _read(self, source: BinaryIO, progress: Progress | None) -> Iterator[bytes]:
        done = 0
        while chunk := source.read(self._chunk_bytes):
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
        for chunk in self._client.encrypt_stream(self._key_id, self._read(source, progress), aad=aad):
            destination.write(chunk)
            written += len(chunk)
        return written

    def decrypt(
        self, source: BinaryIO, destination: BinaryIO, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Decrypt into `destination`; the plaintext bytes written. If this raises, what was written
        is not to be trusted (truncation shows only at the end): decrypt_file handles that for paths."""
        written = 0
        for chunk in self._client.decrypt_stream(self._read(source, progress), aad=aad, key_id=self._key_id):
            destination.write(chunk)
            written += len(chunk)
        return written

    def encrypt_file(
        self, source: Path, destination: Path, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        with source.open("rb") as reader:
            return write_atomically(destination, lambda out: self.encrypt(reader, out, aad=aad, progress=progress))

    def decrypt_file(
        self, source: Path, destination: Path, *, aad: bytes = b"", progress: Progress | None = None
    ) -> int:
        """Decrypt into a temporary file beside `destination`, renamed into place only when the whole
        stream verified: a damaged file never leaves a partial plaintext behind."""
        with source.open("rb") as reader:
            return write_atomically(destination, lambda out: self.decrypt(reader, out, aad=aad, progress=progress))


def write_atomically(destination: Path, write: Callable[[BinaryIO], int]) -> int:
    """Run `write` into a temporary file beside `destination` and rename it into place only if it
    succeeds; on any error the temporary file is removed and `destination` is untouched."""
    handle, temporary = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.")
    try:
        with os.fdopen(handle, "wb") as writer:
            written = write(writer)
        os.replace(temporary, destination)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return written
