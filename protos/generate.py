"""Generate the Python stubs in crypto_client/v1/ from protos/caas/crypto/v1/.

protoc writes modules that import each other as `caas.crypto.v1`, the proto
package. The stubs ship inside `crypto_client`, so those imports are rewritten
to `crypto_client.v1`; nothing else in the generated text is touched (the
serialized descriptors keep the proto package name, which is what the wire,
reflection and grpcurl see).

    python protos/generate.py            # regenerate crypto_client/v1/
    python protos/generate.py --check    # fail if crypto_client/v1/ differs
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "protos"
PROTO_DIR = PROTO_ROOT / "caas" / "crypto" / "v1"
TARGET = ROOT / "crypto_client" / "v1"
SERVICE_PROTOS = {"key_service.proto", "crypto_service.proto"}
INIT_TEXT = '"""Generated protobuf and gRPC stubs for caas.crypto.v1 (see protos/). Do not edit."""\n'


def _protoc(args: list[str]) -> None:
    # protoc plugins (protoc-gen-mypy) are looked up on PATH: put this
    # interpreter's scripts directory first so a virtualenv works unactivated.
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    command = [sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO_ROOT}", *args]
    subprocess.run(command, check=True, env=env)  # noqa: S603 (fixed arguments, this interpreter)


def generate(out: Path) -> None:
    """Write every stub for the protos into `out` (a flat directory)."""
    with tempfile.TemporaryDirectory() as raw_dir:
        protos = sorted(PROTO_DIR.glob("*.proto"))
        services = [p for p in protos if p.name in SERVICE_PROTOS]
        _protoc([f"--python_out={raw_dir}", f"--mypy_out=quiet:{raw_dir}", *map(str, protos)])
        _protoc([f"--grpc_python_out={raw_dir}", f"--mypy_grpc_out=quiet:{raw_dir}", *map(str, services)])
        out.mkdir(parents=True, exist_ok=True)
        (out / "__init__.py").write_text(INIT_TEXT)
        for path in sorted((Path(raw_dir) / "caas" / "crypto" / "v1").iterdir()):
            lines = path.read_text().splitlines(keepends=True)
            rewritten = [
                line.replace("from caas.crypto.v1 import", "from crypto_client.v1 import", 1)
                if line.startswith("from caas.crypto.v1 import")
                else line
                for line in lines
            ]
            (out / path.name).write_text("".join(rewritten))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        shutil.rmtree(TARGET, ignore_errors=True)
        generate(TARGET)
        return 0
    with tempfile.TemporaryDirectory() as fresh:
        generate(Path(fresh))
        fresh_names = sorted(p.name for p in Path(fresh).iterdir())
        committed = sorted(p.name for p in TARGET.iterdir() if p.name != "__pycache__") if TARGET.exists() else []
        _, mismatch, errors = filecmp.cmpfiles(fresh, TARGET, fresh_names, shallow=False)
        drift = sorted(set(mismatch) | set(errors) | (set(committed) ^ set(fresh_names)))
    if drift:
        print("generated stubs are out of date (run `make proto`): " + ", ".join(drift), file=sys.stderr)
        return 1
    print("generated stubs match the protos")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
