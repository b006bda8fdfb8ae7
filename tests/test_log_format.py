"""Log lines are valid JSON whatever a caller puts in the logged fields."""

from __future__ import annotations

import io
import json
import logging
import sys
import time

import pytest

from crypto_server.log_format import JsonFormatter, configure_logging, stop_logging
from crypto_server.transport import access_log
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


def test_a_standard_filter_and_formatter_work_on_access_records() -> None:
    seen: list[tuple[str, int, float, str, str]] = []

    class NoHealthChecks(logging.Filter):
        """An operator's filter, written against the standard LogRecord attributes only."""

        def filter(self, record: logging.LogRecord) -> bool:
            seen.append((record.name, record.levelno, record.created, record.getMessage(), record.levelname))
            return getattr(record, "method", "") != "/grpc.health.v1.Health/Check"

    lines = io.StringIO()
    handler = logging.StreamHandler(lines)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(module)s:%(lineno)d %(message)s %(method)s")
    )
    handler.addFilter(NoHealthChecks())
    logger = logging.getLogger(access_log.LOGGER_NAME)
    logger.addHandler(handler)
    try:
        before = time.time()
        access_log.record("/grpc.health.v1.Health/Check", "", "", "OK", 0.1, "r-1")
        access_log.record("/caas.crypto.v1.CryptoService/Encrypt", "acme", "k-1", "OK", 0.2, "r-2")
    finally:
        logger.removeHandler(handler)
    assert [entry[:2] + entry[3:] for entry in seen] == [("crypto_server.rpc", logging.INFO, "rpc", "INFO")] * 2
    assert all(before <= entry[2] <= time.time() for entry in seen)
    written = lines.getvalue().splitlines()
    assert len(written) == 1 and written[0].endswith(
        " INFO crypto_server.rpc :0 rpc /caas.crypto.v1.CryptoService/Encrypt"
    )


def test_the_access_line_is_the_line_the_generic_path_would_write() -> None:
    fast = AccessRecord("/caas.crypto.v1.CryptoService/Encrypt", "acme", "k-1", "OK", 1.25, "r-1")
    generic = logging.LogRecord("crypto_server.rpc", logging.INFO, "", 0, "rpc", None, None)
    generic.created = fast.created
    for field in ("method", "tenant_id", "key_id", "code", "duration_ms", "request_id"):
        setattr(generic, field, getattr(fast, field))
    assert json.loads(JsonFormatter().format(fast)) == json.loads(JsonFormatter().format(generic))


def test_configured_logging_writes_every_line_by_the_time_it_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))
    monkeypatch.setattr(root, "level", root.level)
    for switch in ("logThreads", "logProcesses", "logMultiprocessing"):
        monkeypatch.setattr(logging, switch, getattr(logging, switch))
    configure_logging("INFO")
    try:
        for number in range(50):
            access_log.record("/caas.crypto.v1.CryptoService/Encrypt", "acme", f"k-{number}", "OK", 0.5, "r")
        try:
            raise ValueError("the detail")
        except ValueError:
            logging.getLogger("crypto_server").exception("a failure")
    finally:
        stop_logging()
    entries = [json.loads(line) for line in stderr.getvalue().splitlines()]
    assert [entry["key_id"] for entry in entries[:50]] == [f"k-{number}" for number in range(50)]
    assert entries[50]["msg"] == "a failure" and "ValueError: the detail" in entries[50]["exception"]
