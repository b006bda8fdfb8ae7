"""Stream messages encoded and read without protobuf (transport/stream_messages.py, crypto_client/_stream_messages.py)
mean exactly what protobuf's own encoding and parser make of them."""

from __future__ import annotations

from typing import Any

import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from crypto_client import _stream_messages as client_side
from crypto_client.v1 import crypto_service_pb2 as pb
from crypto_server.transport.stream_messages import (
    ChunkOnlyRequest,
    encode_stream_response,
    stream_request_deserializer,
    stream_response_serializer,
)

# Lengths either side of each varint width, and a large one.
SIZES = [0, 1, 127, 128, 16383, 16384, 2**21 - 1, 2**21, 3 * 1024 * 1024 + 5]
REQUESTS = [pb.EncryptStreamRequest, pb.DecryptStreamRequest]
RESPONSES = [pb.EncryptStreamResponse, pb.DecryptStreamResponse]


def _fields(message: Any, kind: Any) -> dict[str, Any]:
    return {
        field.name: bytes(getattr(message, field.name)) if field.name == "chunk" else getattr(message, field.name)
        for field in kind.DESCRIPTOR.fields
    }


@pytest.mark.parametrize("kind", RESPONSES)
@pytest.mark.parametrize("size", SIZES)
def test_an_encoded_response_parses_as_the_message_protobuf_would_build(kind: Any, size: int) -> None:
    chunk = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    pieces = [chunk[: size // 3], memoryview(chunk)[size // 3 :]]
    for key_id, version in (("", 0), ("a-key-ü", 1), ("k" * 200, 2**32 - 1)):
        wire = stream_response_serializer(kind.SerializeToString)(encode_stream_response(pieces, key_id, version))
        assert wire == kind(chunk=chunk, key_id=key_id, key_version=version).SerializeToString()
        assert kind.FromString(wire) == kind(chunk=chunk, key_id=key_id, key_version=version)


@pytest.mark.parametrize("kind", REQUESTS)
def test_messages_go_out_through_the_serializer_as_protobuf_serializes_them(kind: Any) -> None:
    message = kind(tenant_id="t1", chunk=b"abc")
    assert stream_response_serializer(kind.SerializeToString)(message) == message.SerializeToString()


@pytest.mark.parametrize("kind", REQUESTS)
@pytest.mark.parametrize("size", SIZES[1:])  # an empty chunk is no field at all: protobuf reads that message
def test_a_chunk_only_request_is_read_in_place_with_every_other_field_at_its_default(kind: Any, size: int) -> None:
    chunk = b"\x0a" * size
    wire = kind(chunk=chunk).SerializeToString()
    read = stream_request_deserializer(kind)(wire)
    assert isinstance(read, ChunkOnlyRequest)
    assert isinstance(read.chunk, memoryview) and read.chunk.obj is wire  # a view: no copy
    assert _fields(read, kind) == _fields(kind.FromString(wire), kind)


@pytest.mark.parametrize("kind", REQUESTS)
@given(tenant=st.text(max_size=5), aad=st.binary(max_size=5), key=st.text(max_size=5), chunk=st.binary(max_size=300))
@settings(max_examples=40, deadline=None)
def test_any_request_reads_as_protobuf_reads_it(kind: Any, tenant: str, aad: bytes, key: str, chunk: bytes) -> None:
    wire = kind(tenant_id=tenant, aad=aad, key_id=key, chunk=chunk).SerializeToString()
    assert _fields(stream_request_deserializer(kind)(wire), kind) == _fields(kind.FromString(wire), kind)


@pytest.mark.parametrize("kind", REQUESTS)
@given(wire=st.binary(max_size=40))
@settings(max_examples=200, deadline=None)
def test_arbitrary_bytes_read_as_protobuf_reads_them_or_fail_as_it_fails(kind: Any, wire: bytes) -> None:
    # A chunk tag with a length that runs short or long, a second field after the chunk, garbage: all are left to
    # protobuf, so a malformed message is still refused (the middleware answers INVALID_ARGUMENT).
    read = stream_request_deserializer(kind)
    try:
        expected = _fields(kind.FromString(wire), kind)
    except DecodeError:
        with pytest.raises(DecodeError):
            read(wire)
        return
    assert _fields(read(wire), kind) == expected


@pytest.mark.parametrize(
    ("encode", "kind"),
    [
        (client_side.encrypt_chunk_request, pb.EncryptStreamRequest),
        (client_side.decrypt_chunk_request, pb.DecryptStreamRequest),
    ],
)
@pytest.mark.parametrize("size", SIZES)
def test_the_clients_chunk_requests_are_what_protobuf_serializes(encode: Any, kind: Any, size: int) -> None:
    chunk = b"\xff" * size
    wire = client_side.serialize_stream_request(encode(chunk))
    assert kind.FromString(wire) == kind(chunk=chunk)
    if size:  # (the client sends no empty chunk; protobuf would leave that field out)
        assert wire == kind(chunk=chunk).SerializeToString()
    opening = kind(tenant_id="t1", aad=b"a")
    assert client_side.serialize_stream_request(opening) == opening.SerializeToString()


@pytest.mark.parametrize("kind", RESPONSES)
@given(
    key=st.text(max_size=5),
    version=st.integers(0, 2**32 - 1),
    chunk=st.binary(max_size=300),
    tail=st.binary(max_size=6),
)
@settings(max_examples=100, deadline=None)
def test_the_client_reads_any_response_as_protobuf_reads_it(
    kind: Any, key: str, version: int, chunk: bytes, tail: bytes
) -> None:
    read = client_side.stream_response_deserializer(kind)
    for wire in (
        kind(chunk=chunk, key_id=key, key_version=version).SerializeToString(),
        kind(chunk=chunk).SerializeToString() + tail,
    ):
        try:
            expected = kind.FromString(wire).chunk
        except DecodeError:
            with pytest.raises(DecodeError):
                read(wire)
            continue
        assert read(wire).chunk == expected
