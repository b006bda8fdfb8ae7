"""The segmented streaming ciphertext format, version 2 (docs/ciphertext-format.md), after Tink's
streaming AEAD and the STREAM construction.

Header (64 bytes):

    0   1   format version, 0x02
    1   16  key id (UUID bytes)
    17  4   key version, big-endian
    21  4   segment size (plaintext bytes per segment), big-endian
    25  32  salt (random)
    57  7   nonce prefix (random)

Then segments: AES-256-GCM of `segment size` plaintext bytes (the last one
shorter, possibly empty), each `segment size + 16` bytes but the last.

- Segment key: HKDF-SHA256(key version material, salt, info = "caas.crypto.v1/stream" 0x00 ||
  u16 len || tenant_id || header bytes 0..24). A fresh salt gives every stream its own key.
- Nonce of segment i: nonce prefix (7) || i as u32 big-endian || 0x01 for the last segment, else 0x00.
- Associated data of every segment: the whole header || the caller's aad.

So a reordered, dropped or duplicated segment has the wrong counter in its
nonce, a truncated stream ends on a segment not marked last, and an extended
one has data after the last: each fails the GCM tag.
"""

from __future__ import annotations

import os
import struct
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from crypto_server.domain.errors import DecryptionFailed

FORMAT_VERSION = 2
HEADER_BYTES = 64
TAG_BYTES = 16
DEFAULT_SEGMENT_BYTES = 64 * 1024
MIN_SEGMENT_BYTES = 4 * 1024
MAX_SEGMENT_BYTES = 4 * 1024 * 1024
_HEADER = struct.Struct(">B16sII32s7s")
_INFO = b"caas.crypto.v1/stream\x00"
MAX_SEGMENTS = 2**32 - 1


@dataclass(frozen=True, slots=True)
class StreamHeader:
    key_id: uuid.UUID
    key_version: int
    segment_bytes: int
    salt: bytes
    nonce_prefix: bytes
    raw: bytes


def _segment_aead(material: bytes, tenant_id: str, header: bytes) -> AESGCM:
    tenant = tenant_id.encode()
    info = _INFO + len(tenant).to_bytes(2, "big") + tenant + header[:25]
    salt = header[25:57]
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(material))


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    if index > MAX_SEGMENTS:
        raise ValueError("stream too long")
    return prefix + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def _whole_segments(
    pending: bytearray,
    chunk: bytes | memoryview,
    size: int,
    process: Callable[[bytes | bytearray | memoryview, bool], bytes],
) -> list[bytes]:
    """`process(segment, last=False)` of each whole segment that `pending` followed by `chunk` holds, except the
    last whole one when nothing follows it (it may be the final segment); the rest is left in `pending`.

    The segments are read from `chunk` in place: only what completes the pending segment and the tail are
    copied (at most two segments per chunk), never the whole chunk.
    """
    done: list[bytes] = []
    with memoryview(chunk) as view:
        start = 0
        if pending:
            start = min(size - len(pending), len(view))
            pending += view[:start]
            if len(view) == start:  # nothing follows the pending segment yet: keep it back
                return done
            done.append(process(pending, False))
            pending.clear()
        while len(view) - start > size:
            done.append(process(view[start : start + size], False))
            start += size
        pending += view[start:]
    return done


class StreamEncryptor:
    """Turns plaintext chunks into the stream: header, then sealed segments. Holds at most one
    segment of plaintext (the final one can only be sealed once the input has ended)."""

    def __init__(
        self,
        material: bytes,
        tenant_id: str,
        key_id: uuid.UUID,
        key_version: int,
        aad: bytes,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        self.header = _HEADER.pack(
            FORMAT_VERSION, key_id.bytes, key_version, segment_bytes, os.urandom(32), os.urandom(7)
        )
        self._aead = _segment_aead(material, tenant_id, self.header)
        self._prefix = self.header[57:64]
        self._aad = self.header + aad
        self._segment_bytes = segment_bytes
        self._pending = bytearray()
        self._index = 0

    def _seal(self, data: bytes | bytearray | memoryview, last: bool) -> bytes:
        sealed = self._aead.encrypt(_nonce(self._prefix, self._index, last), data, self._aad)
        self._index += 1
        return sealed

    def update(self, chunk: bytes | memoryview) -> bytes:
        """The sealed segments that `chunk` completes, joined (possibly nothing). The last full
        segment is kept back: it may be the final one."""
        return b"".join(self.update_segments(chunk))

    def update_segments(self, chunk: bytes | memoryview) -> list[bytes]:
        """As update, one item per sealed segment (whoever sends them joins them once, with its framing)."""
        return _whole_segments(self._pending, chunk, self._segment_bytes, self._seal)

    def finish(self) -> bytes:
        """The final segment (possibly of nothing), marked last."""
        final = bytes(self._pending)
        self._pending.clear()
        return self._seal(final, last=True)


def read_header(data: bytes) -> StreamHeader:
    if len(data) < HEADER_BYTES or data[0] != FORMAT_VERSION:
        raise DecryptionFailed()
    _, key_id, key_version, segment_bytes, salt, prefix = _HEADER.unpack_from(data)
    if not MIN_SEGMENT_BYTES <= segment_bytes <= MAX_SEGMENT_BYTES:
        raise DecryptionFailed()
    return StreamHeader(uuid.UUID(bytes=key_id), key_version, segment_bytes, salt, prefix, bytes(data[:HEADER_BYTES]))


class StreamDecryptor:
    """Opens the segments that follow a header; holds at most one sealed segment back (it may be the last)."""

    def __init__(self, material: bytes, tenant_id: str, header: StreamHeader, aad: bytes) -> None:
        self._aead = _segment_aead(material, tenant_id, header.raw)
        self._prefix = header.nonce_prefix
        self._aad = header.raw + aad
        self._sealed_bytes = header.segment_bytes + TAG_BYTES
        self._pending = bytearray()
        self._index = 0

    def _open(self, sealed: bytes | bytearray | memoryview, last: bool) -> bytes:
        try:
            opened = self._aead.decrypt(_nonce(self._prefix, self._index, last), sealed, self._aad)
        except (InvalidTag, ValueError):
            raise DecryptionFailed() from None
        self._index += 1
        return opened

    def update(self, chunk: bytes | memoryview) -> bytes:
        """The plaintext of the segments `chunk` completes, joined (possibly nothing)."""
        return b"".join(self.update_segments(chunk))

    def update_segments(self, chunk: bytes | memoryview) -> list[bytes]:
        """As update, one item per opened segment."""
        return _whole_segments(self._pending, chunk, self._sealed_bytes, self._open)

    def finish(self) -> bytes:
        if len(self._pending) < TAG_BYTES:
            raise DecryptionFailed()
        final = bytes(self._pending)
        self._pending.clear()
        return self._open(final, last=True)


def encrypt_all(encryptor: StreamEncryptor, chunks: Iterable[bytes | memoryview]) -> Iterator[list[bytes]]:
    """The header, then the sealed segments each input chunk completes (one list per chunk), then the last."""
    yield [encryptor.header]
    for chunk in chunks:
        sealed = encryptor.update_segments(chunk)
        if sealed:
            yield sealed
    yield [encryptor.finish()]
