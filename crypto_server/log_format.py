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
from dataclasses import dataclass
from typing import TextIO

from crypto_server.domain.sampling import parse_sampling

# Attributes every LogRecord has; anything else was passed with `extra=` and is logged as a field.
_STANDARD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# One encoder for every line (json.dumps with options builds a new one each call).
_ENCODER = json.JSONEncoder(default=str)

# The most lines one write carries: under load the queue may never drain, and the lines must still go out.
_MAX_LINES_PER_WRITE = 1000
# After a write the writer lets lines gather this long: one wake-up and one write per interval under load, rather
# than one per RPC (each wake-up and each write hands the GIL over, which the request threads then wait to get
# back). A line reaches stderr at most this much later.
_WRITE_INTERVAL_S = 0.02


@dataclass(frozen=True, slots=True)
class AccessLogMode:
    """Which RPCs get an access line (CRYPTO_ACCESS_LOG): `all`; `errors`, every call that did not end OK (every
    denial among them); `sampled:N`, those plus one successful call in N."""

    mode: str  # "all", "errors" or "sampled"
    every: int = 1

    @classmethod
    def parse(cls, text: str) -> AccessLogMode:
        """Raises ValueError with a message naming the accepted forms."""
        return cls(*parse_sampling(text, ("all", "errors")))

    @property
    def successes_every(self) -> int:
        """One successful call in this many gets a line; 0: none does."""
        return {"all": 1, "errors": 0}.get(self.mode, self.every)

    def __str__(self) -> str:
        return f"sampled:{self.every}" if self.mode == "sampled" else self.mode


class JsonFormatter(logging.Formatter):
    """`{"ts", "level", "logger", "msg", ...every extra= field}`; kept cheap, it runs once per RPC.

    A record with a `render_json(timestamp)` method writes its own line in this shape: the access log's
    records do, as building the dictionary below costs more than the call they describe.
    """

    def __init__(self) -> None:
        super().__init__()
        # The last second rendered, and its text: under load many lines share a second (one tuple, so a
        # formatter shared by threads never pairs a second with another second's text).
        self._second: tuple[int, str] = (-1, "")

    def format(self, record: logging.LogRecord) -> str:
        seconds = int(record.created)
        second = self._second
        if second[0] != seconds:
            second = self._second = (seconds, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)))
        milliseconds = int((record.created - seconds) * 1000)
        timestamp = f"{second[1]}.{milliseconds:03d}+00:00"
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

    def handle(self, record: logging.LogRecord) -> bool:
        """`Handler.handle` without the handler's lock: putting on a SimpleQueue needs none, and every request
        thread would take that one lock once per RPC."""
        kept = self.filter(record)
        if kept:
            self.emit(kept if isinstance(kept, logging.LogRecord) else record)
        return bool(kept)

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if record.exc_info:
            # A traceback's frames may change once this thread moves on: render it now.
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


class _BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that keeps lines until `flush` (the listener's, once it has drained the queue), so under
    load the lines of many RPCs cost one system call, not one each. It runs on the listener's thread only."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self.setFormatter(JsonFormatter())
        self._lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._lines.append(self.format(record))
        except Exception:
            self.handleError(record)
            return
        if len(self._lines) >= _MAX_LINES_PER_WRITE:
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


class _BatchingQueueListener(logging.handlers.QueueListener):
    """Drains the queue and writes what it found in one go; when that included per-call lines (records that
    render themselves, the access log's), lets lines gather for `_WRITE_INTERVAL_S`. Other lines (start-up,
    warnings) go out at once when no per-call line was just written. While nothing is queued it sleeps until a
    record arrives. `stop()` writes everything queued before it."""

    def _monitor(self) -> None:
        # stop() enqueues the listener's sentinel, None, after the last record.
        records: queue.SimpleQueue[logging.LogRecord | None] = self.queue  # type: ignore[assignment]
        while True:
            record = records.get()  # idle: wait for the next line
            per_call_lines = False
            while record is not None:
                per_call_lines = per_call_lines or hasattr(record, "render_json")
                self.handle(record)
                try:
                    record = records.get_nowait()
                except queue.Empty:
                    break
            for handler in self.handlers:
                handler.flush()
            if record is None:
                return
            if per_call_lines:
                time.sleep(_WRITE_INTERVAL_S)


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
    _listener = _BatchingQueueListener(records, _BatchingStreamHandler(sys.stderr))
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
