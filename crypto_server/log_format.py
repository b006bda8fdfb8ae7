"""Structured logs: one JSON object per line on stderr, written off the request threads.

Request threads only put the record on a queue (`logging.handlers.QueueHandler`); one
`logging.handlers.QueueListener` thread formats and writes. With a log line per RPC, a shared stream
handler's lock and write would otherwise sit on every call's path.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from collections.abc import Callable
from typing import TextIO

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# One encoder for every line (json.dumps with options builds a new one each call).
_ENCODER = json.JSONEncoder(default=str)

# The most lines one write carries: under load the queue may never drain, and the lines must still go out.
_MAX_LINES_PER_WRITE = 1000


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...every extra= field}`; kept cheap, it runs once per RPC.

    A record with a `render_json(timestamp)` method writes its own line in this shape: the access log's
    records do, as building the dictionary below costs more than the call they describe.
    """

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        milliseconds = int((record.created - seconds) * 1000)
        timestamp = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{milliseconds:03d}+00:00"
        render: Callable[[str], str] | None = getattr(record, "render_json", None)
        if render is not None:
            return render(timestamp)
        entry: dict[str, object] = {
            "ts": timestamp,
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        fields = vars(record)
        for name in sorted(fields.keys() - _STANDARD_ATTRIBUTES):
            if not name.startswith("_"):
                entry[name] = fields[name]
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:  # rendered before the record crossed threads (_EnqueueRecord)
            entry["exception"] = record.exc_text
        return _ENCODER.encode(entry)


class _EnqueueRecord(logging.handlers.QueueHandler):
    """Hand the record over as it is (the standard `prepare` would format it here, on the request thread)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:
            # A traceback's frames may change once this thread moves on: render it now.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


class _BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes what has queued up in one write and one flush, so under load the lines of
    many RPCs cost one system call, not one each. It runs on the listener's thread only."""

    def __init__(self, stream: TextIO, pending: queue.SimpleQueue[logging.LogRecord]) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._pending = pending
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if self._pending.empty() or len(self._lines) >= _MAX_LINES_PER_WRITE:
            self.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            lines, self._lines = self._lines, []
            try:
                if lines:
                    self.stream.write("\n".join(lines) + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stderr is gone; nothing better to do with a log line


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str) -> None:
    """JSON lines on stderr at `level`, written by a background thread (flushed at exit)."""
    global _listener
    stop_logging()
    # The JSON lines carry none of these, and gathering them costs more per RPC line than the
    # encryption (the logging HOWTO's "Optimization" section lists these switches).
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, _BatchingStreamHandler(sys.stderr, records))
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_EnqueueRecord(records)]
    root.setLevel(level)
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()  # handles every queued record first
        for handler in _listener.handlers:
            handler.flush()
        _listener = None
