"""The segmented stream format: reordering, dropping, duplicating, truncating or extending segments is detected."""

from __future__ import annotations

import itertools
import os
import uuid

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto_server.domain import stream_format as fmt
from crypto_server.domain.errors import DecryptionFailed

SEGMENT = fmt.MIN_SEGMENT_BYTES
MATERIAL = os.urandom(32)
KEY_ID = uuid.uuid4()


def _encrypt(plaintext: bytes, aad: bytes = b"aad") -> tuple[bytes, list[bytes]]:
    encryptor = fmt.StreamEncryptor(MATERIAL, "t1", KEY_ID, 3, aad, segment_bytes=SEGMENT)
    chunks = [plaintext[i : i + 1000] for i in range(0, len(plaintext), 1000)]
    header = encryptor.header
    sealed = b"".join(encryptor.update(chunk) for chunk in chunks) + encryptor.finish()
    size = SEGMENT + fmt.TAG_BYTES
    return header, [sealed[i : i + size] for i in range(0, len(sealed), size)]


def _decrypt(header: bytes, segments: list[bytes], aad: bytes = b"aad", tenant: str = "t1") -> bytes:
    parsed = fmt.read_header(header)
    decryptor = fmt.StreamDecryptor(MATERIAL, tenant, parsed, aad)
    out = b"".join(decryptor.update(segment) for segment in segments)
    return out + decryptor.finish()


PLAINTEXT = os.urandom(SEGMENT * 5 + 123)


def test_round_trip_in_segments_with_a_header() -> None:
    header, segments = _encrypt(PLAINTEXT)
    assert len(header) == fmt.HEADER_BYTES
    parsed = fmt.read_header(header)
    assert (parsed.key_id, parsed.key_version, parsed.segment_bytes) == (KEY_ID, 3, SEGMENT)
    assert len(segments) == 6
    assert all(len(s) == SEGMENT + fmt.TAG_BYTES for s in segments[:-1])
    assert _decrypt(header, segments) == PLAINTEXT


@pytest.mark.parametrize("size", [0, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 2 * SEGMENT])
def test_boundary_sizes_round_trip(size: int) -> None:
    plaintext = os.urandom(size)
    header, segments = _encrypt(plaintext)
    assert _decrypt(header, segments) == plaintext


def test_ciphertext_split_anywhere_still_decrypts() -> None:
    header, segments = _encrypt(PLAINTEXT)
    blob = b"".join(segments)
    parsed = fmt.read_header(header)
    decryptor = fmt.StreamDecryptor(MATERIAL, "t1", parsed, b"aad")
    out = b"".join(decryptor.update(blob[i : i + 777]) for i in range(0, len(blob), 777))
    assert out + decryptor.finish() == PLAINTEXT


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda s: [s[1], s[0], *s[2:]], id="reorder"),
        pytest.param(lambda s: [s[0], *s[2:]], id="drop"),
        pytest.param(lambda s: [s[0], s[0], *s[1:]], id="duplicate"),
        pytest.param(lambda s: s[:-1], id="truncate-at-a-segment"),
        pytest.param(lambda s: [*s[:-1], s[-1][:-5]], id="truncate-inside-the-last"),
        pytest.param(lambda s: [*s, s[-1]], id="extend"),
        pytest.param(lambda s: [s[0][:-1] + bytes([s[0][-1] ^ 1]), *s[1:]], id="flip-a-bit"),
        pytest.param(lambda s: [], id="nothing-after-the-header"),
    ],
)
def test_damaged_streams_fail(damage: object) -> None:
    header, segments = _encrypt(PLAINTEXT)
    with pytest.raises(DecryptionFailed):
        _decrypt(header, damage(segments))  # type: ignore[operator]


def test_another_tenant_or_aad_or_header_fails() -> None:
    header, segments = _encrypt(PLAINTEXT)
    with pytest.raises(DecryptionFailed):
        _decrypt(header, segments, tenant="t2")
    with pytest.raises(DecryptionFailed):
        _decrypt(header, segments, aad=b"other")
    other_header, _ = _encrypt(PLAINTEXT)
    with pytest.raises(DecryptionFailed):
        _decrypt(other_header, segments)


@pytest.mark.parametrize(
    "header", [b"", b"\x02" * 63, b"\x01" + b"\0" * 63, b"\x02" + b"\0" * 20 + b"\0\0\0\1" + b"\0" * 39]
)
def test_malformed_headers_are_rejected(header: bytes) -> None:
    with pytest.raises(DecryptionFailed):
        fmt.read_header(header)


@given(
    plaintext=st.binary(max_size=4 * SEGMENT),
    cuts=st.lists(st.integers(min_value=0, max_value=4 * SEGMENT), max_size=8),
    views=st.booleans(),
)
@settings(max_examples=60, deadline=None)
def test_any_chunking_of_either_side_gives_the_same_segments(plaintext: bytes, cuts: list[int], views: bool) -> None:
    # Chunks are read in place (only a segment's completion and the tail are copied): however the input is cut,
    # and whether the chunks are bytes or views of received messages, the segments and the plaintext are the same.
    bounds = [0, *sorted(c for c in cuts if c <= len(plaintext)), len(plaintext)]
    chunks: list[bytes | memoryview] = [plaintext[a:b] for a, b in itertools.pairwise(bounds)]
    if views:
        chunks = [memoryview(chunk) for chunk in chunks]
    encryptor = fmt.StreamEncryptor(MATERIAL, "t1", KEY_ID, 3, b"aad", segment_bytes=SEGMENT)
    sealed = b"".join(b"".join(encryptor.update_segments(chunk)) for chunk in chunks) + encryptor.finish()
    full, last = divmod(len(plaintext), SEGMENT)
    segments = full + 1 if last or not full else full
    assert len(sealed) == len(plaintext) + segments * fmt.TAG_BYTES
    decryptor = fmt.StreamDecryptor(MATERIAL, "t1", fmt.read_header(encryptor.header), b"aad")
    cut_sealed = [memoryview(sealed)[a : a + 999] if views else sealed[a : a + 999] for a in range(0, len(sealed), 999)]
    opened = b"".join(decryptor.update(chunk) for chunk in cut_sealed) + decryptor.finish()
    assert opened == plaintext
