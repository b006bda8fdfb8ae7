"""Structured logs: one JSON object per line on stderr, written off the request threads.

Request threads only put the record on a queue; one background thread formats
and writes. With a log line per RPC, a shared stream handler's lock and write
would otherwise sit on every call's path.
"""

from __future__ import annotations

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import TextIO

from crypto_server.transport.access_log import AccessRecord

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


# One encoder for every line (json.dumps with options builds a new one each call).
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...every extra= field}`; kept cheap, it runs once per RPC."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        milliseconds = int((record.created - seconds) * 1000)
        timestamp = f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}.{milliseconds:03d}+00:00"
        if isinstance(record, AccessRecord):
            return record.to_json(timestamp)
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
        return _ENCODER.encode(entry)


class _EnqueueRecord(logging.handlers.QueueHandler):
    """Hand the record over as it is; the writer thread formats it."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:
            # Tracebacks cannot cross threads safely later; render them now.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


class _JsonFormatterWithText(JsonFormatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if record.exc_text:
            entry = json.loads(line)
            entry["exception"] = record.exc_text
            line = _ENCODER.encode(entry)
        return line


class _LineWriter:
    """The one thread that formats and writes log lines.

    It writes whatever has queued up in one write and one flush, so under load
    the lines of many RPCs cost one system call, not one each.
    """

    _STOP = object()

    def __init__(self, records: queue.SimpleQueue[object], stream: TextIO) -> None:
        self._records = records
        self._stream = stream
        self._formatter = _JsonFormatterWithText()
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._records.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self._records.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is self._STOP for item in batch)
            lines = [self._formatter.format(r) for r in batch if isinstance(r, logging.LogRecord)]
            if lines:
                try:
                    self._stream.write("\n".join(lines) + "\n")
                    self._stream.flush()
                except (OSError, ValueError):
                    pass  # stderr is gone; nothing better to do with a log line
            if stop:
                return

    def stop(self) -> None:
        self._records.put(self._STOP)
        self._thread.join(timeout=10)


_writer: _LineWriter | None = None


def configure_logging(level: str) -> None:
    """JSON lines on stderr at `level`, written by a background thread (flushed at exit)."""
    global _writer
    stop_logging()
    # The JSON lines carry none of these, and gathering them costs more per RPC line than the
    # encryption (the logging HOWTO's "Optimization" section lists these switches).
    logging._srcfile = None  # no caller frame lookup
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    records: queue.SimpleQueue[object] = queue.SimpleQueue()
    _writer = _LineWriter(records, sys.stderr)
    root = logging.getLogger()
    root.handlers[:] = [_EnqueueRecord(records)]
    root.setLevel(level)
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None
