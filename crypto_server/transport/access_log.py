"""The access log: one JSON line per RPC (method, tenant, key id, status, duration, request id).

It goes through `logging` (logger "crypto_server.rpc", level INFO, the handlers
configured in log_format), but builds its record directly: the generic path
(makeRecord, caller lookup, extra= merging) costs more per line than the
encryption it logs. The record is a complete LogRecord, so standard filters and
handlers work on it; it renders its own JSON line in the writer thread.

Which calls get a line is CRYPTO_ACCESS_LOG (`LineSelection`): every call, or only
those that did not end OK (every denial among them), or those plus one success in N.
"""

from __future__ import annotations

import itertools
import json
import logging

from crypto_server.log_format import AccessLogMode

LOGGER_NAME = "crypto_server.rpc"
_logger = logging.getLogger(LOGGER_NAME)
_quote = json.encoder.encode_basestring


class AccessRecord(logging.LogRecord):
    """The LogRecord of one RPC: message "rpc" at INFO, and the call's fields as attributes."""

    def __init__(
        self, method: str, tenant_id: str, key_id: str, code: str, duration_ms: float, request_id: str
    ) -> None:
        super().__init__(LOGGER_NAME, logging.INFO, "", 0, "rpc", None, None)
        self.method = method
        self.tenant_id = tenant_id
        self.key_id = key_id
        self.code = code
        self.duration_ms = duration_ms
        self.request_id = request_id

    def render_json(self, timestamp: str) -> str:
        """The line log_format's JsonFormatter would write, without building a dictionary first."""
        return (
            f'{{"ts": "{timestamp}", "level": "info", "logger": "{LOGGER_NAME}", "msg": "rpc", '
            f'"method": {_quote(self.method)}, "tenant_id": {_quote(self.tenant_id)}, '
            f'"key_id": {_quote(self.key_id)}, "code": "{self.code}", '
            f'"duration_ms": {self.duration_ms:.3f}, "request_id": {_quote(self.request_id)}}}'
        )


def enabled() -> bool:
    return _logger.isEnabledFor(logging.INFO)


def record(method: str, tenant_id: str, key_id: str, code: str, duration_ms: float, request_id: str) -> None:
    _logger.handle(AccessRecord(method, tenant_id, key_id, code, duration_ms, request_id))


class LineSelection:
    """Which finished calls get an access line, per CRYPTO_ACCESS_LOG. Every call that did not end OK does, in
    every mode: a denial (PERMISSION_DENIED, UNAUTHENTICATED) or an error is never sampled away. Successful calls
    are counted, not drawn at random, so `sampled:N` logs exactly the 1st, (N+1)th, ... success of the process."""

    def __init__(self, mode: AccessLogMode | None = None) -> None:
        self.mode = mode or AccessLogMode("all")
        self._successes_every = self.mode.successes_every
        self._successes = itertools.count()  # next() on it is atomic under the GIL: no lock per call

    def wants(self, ok: bool) -> bool:
        """Whether a call that ended OK (`ok`), or did not, gets a line."""
        every = self._successes_every
        if not ok or every == 1:
            return True
        return every != 0 and next(self._successes) % every == 0
