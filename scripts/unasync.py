"""Generate the blocking client and helpers (crypto_client/_sync) from their asyncio sources (crypto_client/_async).

As httpcore does: the async code is the one declaration; this token rewrite turns it into the blocking copy
(`async def` -> `def`, `await x` -> `x`, `AsyncCryptoClient` -> `CryptoClient`, `grpc.aio.` -> `grpc.`, ...),
then ruff sorts the imports and formats it. `make unasync` writes the copies; `make unasync-check` (and
tests/client/test_unasync.py) fails when a committed copy differs from what the sources generate.

    python scripts/unasync.py [--check]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "crypto_client" / "_async"
TARGET = ROOT / "crypto_client" / "_sync"
HEADER = "# Generated from crypto_client/_async/{name} by scripts/unasync.py (make unasync): do not edit.\n"

# Applied in order to each line; the identifier rule comes last.
_SUBSTITUTIONS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\basync def\b"), "def"),
    (re.compile(r"\basync with\b"), "with"),
    (re.compile(r"\basync for\b"), "for"),
    (re.compile(r"\bawait "), ""),
    (re.compile(r"\bAwaitable\[([\w.]+)\]"), r"\1"),
    (re.compile(r"\b__aenter__\b"), "__enter__"),
    (re.compile(r"\b__aexit__\b"), "__exit__"),
    (re.compile(r"\bStopAsyncIteration\b"), "StopIteration"),
    (re.compile(r"\bgrpc\.aio\."), "grpc."),
    (re.compile(r"\bcrypto_client\._async\b"), "crypto_client._sync"),
    (re.compile(r"\basyncio (client|services)\b"), r"blocking \1"),
    # AsyncCryptoClient, AsyncIterator, AsyncRetrying, AsyncLock, _AsyncPublicKeyCache, ... lose the prefix.
    (re.compile(r"(?<![A-Za-z0-9])Async([A-Z]\w*)"), r"\1"),
]


def rewrite(source: str) -> str:
    lines = []
    for line in source.splitlines(keepends=True):
        for pattern, replacement in _SUBSTITUTIONS:
            line = pattern.sub(replacement, line)
        lines.append(line)
    return "".join(lines)


def _ruff() -> str:
    local = Path(sys.executable).parent / "ruff"
    found = str(local) if local.exists() else shutil.which("ruff")
    if found is None:
        raise SystemExit("unasync: ruff is needed to format the generated code (make install)")
    return found


# What `ruff check` finds by itself once crypto_client/_sync exists; said here so a first run sorts alike.
_FIRST_PARTY = ["--config", "lint.isort.known-first-party = ['crypto_client']"]


def _tidy(code: str, path: Path) -> str:
    """Sort imports, drop the ones the rewrite left unused or doubled, and format, as `make lint` would."""
    ruff = _ruff()
    relative = str(path.relative_to(ROOT))
    fixed = subprocess.run(
        [
            ruff,
            "check",
            "--fix",
            "--quiet",
            "--exit-zero",
            "--select",
            "I,F401",
            *_FIRST_PARTY,
            "--stdin-filename",
            relative,
            "-",
        ],
        input=code,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    formatted = subprocess.run(
        [ruff, "format", "--quiet", "--stdin-filename", relative, "-"],
        input=fixed,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout
    return formatted


def generated() -> dict[Path, str]:
    """Every file of crypto_client/_sync, as the sources make it."""
    out: dict[Path, str] = {}
    for source in sorted(SOURCE.glob("*.py")):
        target = TARGET / source.name
        text = source.read_text()
        if source.name == "__init__.py":
            out[target] = (
                '"""Generated from crypto_client/_async by scripts/unasync.py (make unasync): do not edit."""\n'
            )
            continue
        out[target] = HEADER.format(name=source.name) + _tidy(rewrite(text), target)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if crypto_client/_sync is not current")
    check = parser.parse_args(argv).check
    wanted = generated()
    stale = sorted(str(p.relative_to(ROOT)) for p, text in wanted.items() if not p.exists() or p.read_text() != text)
    extra = sorted(str(p.relative_to(ROOT)) for p in TARGET.glob("*.py") if p not in wanted)
    if check:
        if stale or extra:
            print("crypto_client/_sync is stale; run `make unasync`:", *stale, *extra, sep="\n  ", file=sys.stderr)
            return 1
        return 0
    TARGET.mkdir(exist_ok=True)
    for path in stale:
        (ROOT / path).write_text(wanted[ROOT / path])
    for path in extra:
        (ROOT / path).unlink()
    print(f"unasync: {len(stale)} written, {len(extra)} removed, {len(wanted) - len(stale)} current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
