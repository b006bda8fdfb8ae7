"""EncryptStream / DecryptStream messages that carry only a chunk, in protobuf's wire format, without protobuf.

Requests after the opening one are encoded here; a response that holds nothing but its chunk is read here
(any other response goes to protobuf).

Why: building `EncryptStreamRequest(chunk=...)` and serializing it costs about 1 ms per MiB (upb copies the bytes
into the message and again into the output), against ~0.05 ms for one join behind a field tag and a length: with
the client and server sharing the machine, that was a large part of a stream's cost (docs/performance.md,
"Streams"). The opening message (tenant, key, aad) stays an ordinary message.

A chunk-only message is one length-delimited field: tag (field number << 3 | 2) as a varint, the length as a
varint, the bytes. The field numbers come from the generated descriptors, so they cannot drift from the protos.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message

from crypto_client.v1 import crypto_service_pb2 as crypto_pb

_LENGTH_DELIMITED = 2


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _chunk_tag(message: Any) -> bytes:
    return _varint(message.DESCRIPTOR.fields_by_name["chunk"].number << 3 | _LENGTH_DELIMITED)


_ENCRYPT_CHUNK_TAG = _chunk_tag(crypto_pb.EncryptStreamRequest)
_DECRYPT_CHUNK_TAG = _chunk_tag(crypto_pb.DecryptStreamRequest)


def encrypt_chunk_request(chunk: bytes) -> bytes:
    """An EncryptStreamRequest holding only `chunk`, serialized."""
    return b"".join((_ENCRYPT_CHUNK_TAG, _varint(len(chunk)), chunk))


def decrypt_chunk_request(chunk: bytes) -> bytes:
    """A DecryptStreamRequest holding only `chunk`, serialized."""
    return b"".join((_DECRYPT_CHUNK_TAG, _varint(len(chunk)), chunk))


def serialize_stream_request(request: Any) -> bytes:
    """The request serializer of the streaming calls: a message is serialized, encoded bytes go as they are."""
    if isinstance(request, bytes):
        return request
    serialized: bytes = request.SerializeToString()
    return serialized


class ChunkOnlyResponse:
    """A stream response that held only its chunk (every one after the first), read without protobuf."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: bytes) -> None:
        self.chunk = chunk


def _read_varint(data: bytes, position: int) -> tuple[int, int]:
    """The varint at `position` and the position after it; (-1, position) when there is none (at most 10 bytes)."""
    value = 0
    for shift in range(0, 70, 7):
        if position >= len(data):
            break
        byte = data[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, position
    return -1, position


def stream_response_deserializer(response_class: type[Message]) -> Callable[[bytes], Any]:
    """Reads `response_class`: exactly one `chunk` field becomes a ChunkOnlyResponse (one copy of the chunk, where
    protobuf makes two); anything else is left to protobuf's own parser."""
    chunk_tag = _varint(response_class.DESCRIPTOR.fields_by_name["chunk"].number << 3 | _LENGTH_DELIMITED)[0]
    parse = response_class.FromString

    def deserialize(data: bytes) -> Any:
        if data[:1] == bytes((chunk_tag,)):
            length, position = _read_varint(data, 1)
            if length >= 0 and position + length == len(data):
                return ChunkOnlyResponse(data[position:])
        return parse(data)

    return deserialize
