"""EncryptStream / DecryptStream messages in protobuf's wire format, without building protobuf messages.

Responses are encoded here; a request that is nothing but its `chunk` (every message after the opening one)
is read here, its chunk a view of the received bytes; any other request goes to protobuf.

Why: building an `EncryptStreamResponse(chunk=...)` and serializing it costs about 1 ms per MiB here
(upb copies the bytes into the message's arena and again into the output, on freshly faulted memory),
against ~0.05 ms for one join of the pieces behind a field tag and a length. That was about a third of
the server's time per streamed MiB (docs/performance.md, "Streams").

The encoding is protobuf's own, for the fields the responses have (protos/caas/crypto/v1/crypto_service.proto;
both response messages number them alike):

    chunk        = 1  bytes   tag 0x0A, varint length, the bytes
    key_id       = 2  string  tag 0x12, varint length, UTF-8
    key_version  = 3  uint32  tag 0x18, varint

Empty and zero fields are left out, as protobuf does. Any protobuf parser reads the result as the message
with those fields (tests/transport/test_stream_messages.py checks it against the generated classes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from google.protobuf.message import Message

from crypto_client.protowire import LENGTH_DELIMITED, chunk_tag, read_varint, varint
from crypto_client.v1 import crypto_service_pb2 as crypto_pb

_VARINT = 0  # the wire type of integer fields


def _tag(field: str, wire_type: int) -> bytes:
    """A response field's tag, from the generated descriptors (so it cannot drift from the protos); both stream
    responses number their fields alike, so one encoder serves both."""
    (number,) = {
        response.DESCRIPTOR.fields_by_name[field].number
        for response in (crypto_pb.EncryptStreamResponse, crypto_pb.DecryptStreamResponse)
    }
    return varint(number << 3 | wire_type)


_CHUNK_TAG = _tag("chunk", LENGTH_DELIMITED)
_KEY_ID_TAG = _tag("key_id", LENGTH_DELIMITED)
_KEY_VERSION_TAG = _tag("key_version", _VARINT)


class EncodedResponse:
    """A stream response already in wire format: the response serializer sends `wire` as it is. (A holder, not
    a bytes subclass: making one of those from bytes would copy them.)"""

    __slots__ = ("wire",)

    def __init__(self, wire: bytes) -> None:
        self.wire = wire


def encode_stream_response(
    pieces: Sequence[bytes | memoryview], key_id: str = "", key_version: int = 0
) -> EncodedResponse:
    """One response whose `chunk` is the pieces joined (copied once), with the key fields when given."""
    parts: list[bytes | memoryview] = []
    size = sum(len(piece) for piece in pieces)
    if size:
        parts += (_CHUNK_TAG, varint(size), *pieces)
    if key_id:
        encoded_key_id = key_id.encode()
        parts += (_KEY_ID_TAG, varint(len(encoded_key_id)), encoded_key_id)
    if key_version:
        parts += (_KEY_VERSION_TAG, varint(key_version))
    return EncodedResponse(b"".join(parts))


def stream_response_serializer(serialize: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
    """`serialize` for messages; an EncodedResponse goes out as it is."""

    def serializer(response: Any) -> bytes:
        if isinstance(response, EncodedResponse):
            return response.wire
        return serialize(response)

    return serializer


class ChunkOnlyRequest:
    """A stream request that held only its chunk, read without protobuf. Its other fields read as protobuf
    reads absent fields (their defaults), so a handler sees what the parsed message would show."""

    __slots__ = ("chunk",)

    def __init__(self, chunk: memoryview) -> None:
        self.chunk = chunk


def stream_request_deserializer(request_class: type[Message]) -> Callable[[bytes], Any]:
    """Reads `request_class` (EncryptStreamRequest or DecryptStreamRequest): a message that is exactly one
    `chunk` field (tag, length, and that many bytes to the end) becomes a ChunkOnlyRequest whose chunk is a view
    of `data`, without a copy; anything else, well-formed or not, is left to protobuf's own parser."""
    descriptor = request_class.DESCRIPTOR
    tag_of_chunk = chunk_tag(request_class)
    # The stream requests have scalar fields only, so each default is an immutable value.
    defaults = {field.name: field.default_value for field in descriptor.fields if field.name != "chunk"}
    chunk_only = type(f"{descriptor.name}ChunkOnly", (ChunkOnlyRequest,), {"__slots__": (), **defaults})
    parse = request_class.FromString

    def deserialize(data: bytes) -> Any:
        tag, position = read_varint(data, 0)
        if tag == tag_of_chunk:
            length, position = read_varint(data, position)
            if length >= 0 and position + length == len(data):
                return chunk_only(memoryview(data)[position:])
        return parse(data)

    return deserialize
