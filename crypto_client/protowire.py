"""The two pieces of protobuf's wire format the streaming calls write and read by hand, on both sides (client:
crypto_client/_stream_messages.py; server: crypto_server/transport/stream_messages.py, which depends on this
distribution for the generated stubs already): varints, and the tag of a message's length-delimited `chunk` field.

Field numbers come from the generated descriptors, so they cannot drift from the protos."""

from __future__ import annotations

from typing import Any

LENGTH_DELIMITED = 2  # the wire type of bytes and string fields


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_varint(data: bytes, position: int) -> tuple[int, int]:
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


def chunk_tag(message_class: Any) -> int:
    """The tag (field number << 3 | wire type) of `message_class`'s `chunk` field."""
    number: int = message_class.DESCRIPTOR.fields_by_name["chunk"].number
    return number << 3 | LENGTH_DELIMITED
