"""Log lines are valid JSON whatever a caller puts in the logged fields."""

from __future__ import annotations

import json
import logging

from crypto_server.log_format import JsonFormatter
from crypto_server.transport.access_log import AccessRecord


def test_access_lines_are_json_even_with_hostile_field_values() -> None:
    hostile = 'evil"\n\\{"code": "OK"}\u2028'
    record = AccessRecord("/caas.crypto.v1.CryptoService/Encrypt", hostile, hostile, "INVALID_ARGUMENT", 1.5, "r-1")
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["tenant_id"] == hostile and entry["key_id"] == hostile
    assert entry["code"] == "INVALID_ARGUMENT"
    assert entry["duration_ms"] == 1.5
    assert entry["msg"] == "rpc" and entry["level"] == "info" and entry["logger"] == "crypto_server.rpc"
    assert entry["ts"].endswith("+00:00")


def test_other_lines_carry_their_extra_fields() -> None:
    record = logging.LogRecord("crypto_server", logging.WARNING, "", 0, "key store %s", ("unreachable",), None)
    record.detail = "timeout"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "key store unreachable"
    assert entry["level"] == "warning"
    assert entry["detail"] == "timeout"
