"""Limits on streaming calls, which hold a worker thread of the threaded server for their whole life.

- `StreamSlots`: at most N streams at once, well below the worker count, so
  unary calls and health always find a free worker. Beyond N a stream is
  refused at once (never queued).
- `IdleLimitedRequests`: a stream that sends nothing for `idle_timeout_s` is
  ended with a clear status, releasing its worker.

grpcio's server-side request iterator blocks without a timeout, and the
public API offers no way to end a blocked call from another thread with a
status of our choosing (`context.cancel()` only resets the stream; the caller
sees a bare CANCELLED). So the handler does not read the iterator itself: a
small reader thread does, at most one message ahead (so reading the next
message overlaps processing this one, without the hand-off per message that
made streams 25 % slower), and hands each over; the handler waits for it with
a timeout. On timeout the handler ends
the call with StreamIdle, and grpc, once the status is sent, wakes the reader
(its pending receive completes empty) so it exits too. Public API only.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

from crypto_server.domain.errors import StreamIdle, StreamLimitReached

DEFAULT_STREAM_IDLE_TIMEOUT_S = 30.0


def default_max_streams(workers: int) -> int:
    """A quarter of the workers: the other three quarters always serve unary calls and health."""
    return max(1, workers // 4)


class StreamSlots:
    """How many streams may run at once; a stream beyond that is refused, never queued."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("StreamSlots needs a limit of at least 1")
        self.limit = limit
        self._free = threading.BoundedSemaphore(limit)

    def take(self) -> None:
        """Take a slot, or raise StreamLimitReached at once."""
        if not self._free.acquire(blocking=False):
            raise StreamLimitReached(self.limit)

    def give_back(self) -> None:
        self._free.release()


# What the reader hands over: a request, the end of the stream, or the error reading raised.
_REQUEST, _END, _FAILED = "request", "end", "failed"


class IdleLimitedRequests:
    """A stream's requests, each awaited at most `idle_timeout_s`; StreamIdle past that.

    The reader thread reads at most `READ_AHEAD` message ahead of the handler, so memory stays bounded by one
    more message than grpc's own iterator holds. `close()` (always, when the call ends) lets it exit.
    """

    READ_AHEAD = 1
    # How often a reader blocked on a full hand-over checks whether the call is over.
    _CLOSE_CHECK_S = 0.5

    def __init__(self, requests: Iterator[Any], idle_timeout_s: float) -> None:
        self._requests = requests
        self._idle_timeout_s = idle_timeout_s
        self._arrived: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.READ_AHEAD)
        self._closed = threading.Event()
        self._reader: threading.Thread | None = None

    def __iter__(self) -> IdleLimitedRequests:
        return self

    def __next__(self) -> Any:
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="stream-reader", daemon=True)
            self._reader.start()
        try:
            kind, value = self._arrived.get(timeout=self._idle_timeout_s)
        except queue.Empty:
            raise StreamIdle(self._idle_timeout_s) from None
        if kind == _REQUEST:
            return value
        if kind == _END:
            raise StopIteration
        raise value

    def close(self) -> None:
        """The call is over: a reader waiting to hand over a message leaves."""
        self._closed.set()

    def _hand_over(self, item: tuple[str, Any]) -> bool:
        while not self._closed.is_set():
            try:
                self._arrived.put(item, timeout=self._CLOSE_CHECK_S)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        while not self._closed.is_set():
            try:
                request = next(self._requests)
            except StopIteration:
                self._hand_over((_END, None))
                return
            except BaseException as error:  # grpc.RpcError when the caller cancels: the handler re-raises it
                self._hand_over((_FAILED, error))
                return
            if not self._hand_over((_REQUEST, request)):
                return
