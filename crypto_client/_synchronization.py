"""The few primitives that differ between the asyncio sources (crypto_client/_async) and their generated
blocking copies (crypto_client/_sync): scripts/unasync.py rewrites `AsyncX` to `X`, so each pair below is
one name in the source."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TypeVar

_T = TypeVar("_T")

# Held across a call to the service: an asyncio.Lock in the event loop, a threading.Lock between threads.
AsyncLock = asyncio.Lock
Lock = threading.Lock


class AsyncBlockingCalls:
    """Blocking file I/O off the event loop (a worker thread), so a large file does not stall other tasks."""

    @staticmethod
    async def run(function: Callable[..., _T], *args: object) -> _T:
        return await asyncio.to_thread(function, *args)


class BlockingCalls:
    @staticmethod
    def run(function: Callable[..., _T], *args: object) -> _T:
        return function(*args)
