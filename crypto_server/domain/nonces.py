"""96-bit AES-GCM nonces from the operating system's CSPRNG, fetched a block at a time.

Why not os.urandom(12) per encryption: CPython releases the GIL around the
getrandom() system call, so on a busy threaded server every nonce costs a GIL
hand-off to another thread and back — measured at tens of microseconds a call,
more than the encryption itself. Reading a block of 4 KiB per thread and
slicing it gives the same bytes from the same source; each byte is used once.

Fork safety: a child process must never reuse bytes its parent also hands
out, so every buffer is dropped in the child after a fork.
"""

from __future__ import annotations

import os
import threading

NONCE_BYTES = 12
_BLOCK_BYTES = NONCE_BYTES * 341  # about 4 KiB


class _Buffer(threading.local):
    block: bytes = b""
    offset: int = 0


_buffers = _Buffer()


def _drop_buffers_in_child() -> None:
    global _buffers
    _buffers = _Buffer()


os.register_at_fork(after_in_child=_drop_buffers_in_child)


def random_nonce() -> bytes:
    """12 bytes never handed out before in this process."""
    buffer = _buffers
    offset = buffer.offset
    if offset + NONCE_BYTES > len(buffer.block):
        buffer.block = os.urandom(_BLOCK_BYTES)
        offset = 0
    buffer.offset = offset + NONCE_BYTES
    return buffer.block[offset : offset + NONCE_BYTES]
