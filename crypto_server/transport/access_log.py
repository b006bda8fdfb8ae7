"""The access log: one JSON line per RPC (method, tenant, key id, status, duration, request id).

It goes through `logging` (logger "crypto_server.rpc", level INFO, the handlers
configured in log_format), but builds its record directly: the generic path
(makeRecord, caller lookup, extra= merging) costs more per line than the
encryption it logs. The record is a complete LogRecord, so standard filters and
handlers work on it; it renders its own JSON line in the writer thread.
"""

from __future__ import annotations

import json
import logging

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
