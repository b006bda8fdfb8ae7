"""What every benchmark command does around its scenarios: time-stamped progress on stderr, the JSON results
written to a file, a table on stdout."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

Log = Callable[[str], None]
_Phases = TypeVar("_Phases")


def run_and_report(
    run: Callable[[_Phases, Log], dict[str, Any]],
    table: Callable[[dict[str, Any]], str],
    phases: _Phases,
    out: Path,
) -> int:
    started = time.monotonic()

    def log(message: str) -> None:
        print(f"[{time.monotonic() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    results = run(phases, log)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    log(f"results written to {out}")
    return 0
