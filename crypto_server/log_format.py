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
import time

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


# One encoder for every line (json.dumps with options builds a new one each call).
_ENCODER = json.JSONEncoder(default=str)


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...every extra= field}`; kept cheap, it runs once per RPC."""

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        entry: dict[str, object] = {
            "ts": f"{time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(seconds))}."
            f"{int((record.created - seconds) * 1000):03d}+00:00",
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


_listener: logging.handlers.QueueListener | None = None


def configure_logging(level: str) -> None:
    """JSON lines on stderr at `level`, written by a background thread (flushed at exit)."""
    global _listener
    stop_logging()
    # The JSON lines carry none of these, and gathering them costs more per RPC line than the
    # encryption (the logging HOWTO's "Optimization" section lists these switches).
    logging._srcfile = None  # no caller frame lookup
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(_JsonFormatterWithText())
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, writer, respect_handler_level=False)
    _listener.start()
    root = logging.getLogger()
    root.handlers[:] = [_EnqueueRecord(records)]
    root.setLevel(level)
    atexit.register(stop_logging)


def stop_logging() -> None:
    """Write out what is queued and stop the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None
