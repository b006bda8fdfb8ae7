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

from crypto_client.protowire import chunk_tag, read_varint, varint
from crypto_client.v1 import crypto_service_pb2 as crypto_pb

_ENCRYPT_CHUNK_TAG = varint(chunk_tag(crypto_pb.EncryptStreamRequest))
_DECRYPT_CHUNK_TAG = varint(chunk_tag(crypto_pb.DecryptStreamRequest))


def encrypt_chunk_request(chunk: bytes) -> bytes:
    """An EncryptStreamRequest holding only `chunk`, serialized."""
    return b"".join((_ENCRYPT_CHUNK_TAG, varint(len(chunk)), chunk))


def decrypt_chunk_request(chunk: bytes) -> bytes:
    """A DecryptStreamRequest holding only `chunk`, serialized."""
    return b"".join((_DECRYPT_CHUNK_TAG, varint(len(chunk)), chunk))


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


def stream_response_deserializer(response_class: type[Message]) -> Callable[[bytes], Any]:
    """Reads `response_class`: exactly one `chunk` field becomes a ChunkOnlyResponse (one copy of the chunk, where
    protobuf makes two); anything else is left to protobuf's own parser."""
    tag = varint(chunk_tag(response_class))
    parse = response_class.FromString

    def deserialize(data: bytes) -> Any:
        if data[: len(tag)] == tag:
            length, position = read_varint(data, len(tag))
            if length >= 0 and position + length == len(data):
                return ChunkOnlyResponse(data[position:])
        return parse(data)

    return deserialize
