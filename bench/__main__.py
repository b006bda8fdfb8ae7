"""`python -m bench [--quick] [--out PATH]`: run every scenario, print a table, write the JSON results.

make bench        -> full phases, bench/results/latest.json
make bench-quick  -> shorter phases (under a minute), bench/results/quick.json
python -m bench --access-log [--quick] -> only the access log modes' cost, bench/results/access-log.json
python -m bench --only key_aging [--only key_count] [--quick] [--aging-versions embedded=10,1000,10000]
python -m bench --only unary [--only large_data] [--quick]
                  -> only those scenarios, bench/results/key_aging.json (names joined by "+")
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import h2load, scenarios
from bench.reporting import run_and_report

TARGETS = (
    # (name, where in the results, comparison, bound)
    ("encrypt rps >= 0.90 x empty RPC @16", ("unary", "embedded", "16", "encrypt", "rps_ratio_to_empty"), ">=", 0.90),
    ("encrypt rps >= 0.90 x empty RPC @64", ("unary", "embedded", "64", "encrypt", "rps_ratio_to_empty"), ">=", 0.90),
    ("decrypt rps >= 0.90 x empty RPC @16", ("unary", "embedded", "16", "decrypt", "rps_ratio_to_empty"), ">=", 0.90),
    ("decrypt rps >= 0.90 x empty RPC @64", ("unary", "embedded", "64", "decrypt", "rps_ratio_to_empty"), ">=", 0.90),
    ("encrypt p99 <= 3 x empty RPC @16", ("unary", "embedded", "16", "encrypt", "p99_ratio_to_empty"), "<=", 3.0),
    ("encrypt p99 <= 3 x empty RPC @64", ("unary", "embedded", "64", "encrypt", "p99_ratio_to_empty"), "<=", 3.0),
    ("encrypt p50 <= 1.15 x empty RPC @1", ("unary", "embedded", "1", "encrypt", "p50_ratio_to_empty"), "<=", 1.15),
    ("decrypt p50 <= 1.15 x empty RPC @1", ("unary", "embedded", "1", "decrypt", "p50_ratio_to_empty"), "<=", 1.15),
    ("Mongo+Redis warm within 10% of embedded @16", ("backend_ratio_16",), ">=", 0.90),
    *(
        (
            f"streaming: {call} >= {bound} x echo stream MB/s",
            ("large_data", f"largest_{call}_ratio_to_echo"),
            ">=",
            bound,
        )
        for call, bound in (("encrypt", 0.8), ("decrypt", 0.8), ("encrypt_file", 0.7), ("decrypt_file", 0.7))
    ),
    ("large data: server RSS flat (+-50 MiB)", ("large_data", "rss_growth_mib"), "<=", 50.0),
    ("2 processes >= 1.5 x 1 process", ("scale_out", "ratio"), ">=", 1.5),
    ("audit denied_only: encrypt rps >= 0.95 x none", ("audit", "denied_only_rps_ratio_to_none"), ">=", 0.95),
    ("audit all: encrypt rps >= 0.60 x none", ("audit", "all_rps_ratio_to_none"), ">=", 0.60),
    (
        "access log all: encrypt >= 0.90 x empty RPC @16",
        ("access_log", "16", "all", "encrypt_to_empty", "median"),
        ">=",
        0.90,
    ),
    ("mTLS + policy + audit denied_only: encrypt rps >= 0.90 x plain", ("security", "rps_ratio"), ">=", 0.90),
    (
        "usage counting: encrypt rps >= 0.95 x before issue 13 @16",
        ("lifecycle", "16", "encrypt_rps_ratio_now_to_before"),
        ">=",
        0.95,
    ),
    *(
        (
            f"{call} >= {bound:,} items/s @{level}",
            ("batches", level, "now", f"{call}_items_per_s", "median"),
            ">=",
            bound,
        )
        for call in ("batch_encrypt", "batch_decrypt")
        for level in ("16", "64")
        for bound in (50_000,)
    ),
    *(
        (
            f"{call} items/s >= 20 x Encrypt rps @{level}",
            ("batches", level, "now", f"{call}_ratio_to_encrypt"),
            ">=",
            20.0,
        )
        for call in ("batch_encrypt", "batch_decrypt")
        for level in ("16", "64")
    ),
    ("HSM root: warm keys within 10% of file root", ("cold_tenants", "hsm_to_file_warm_ratio"), ">=", 0.90),
    *(
        (
            f"{backend} {label}: most / fewest versions",
            ("key_aging", backend, "largest_to_baseline", figure),
            "<=",
            1.5,
        )
        for backend in ("embedded", "mongo_redis")
        for label, figure in (("RotateKey", "rotate_ms"), ("GetKey", "get_key_ms"), ("cold Encrypt", "cold_encrypt_ms"))
    ),
)


def _machine() -> dict[str, Any]:
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "grpcio": version("grpcio"),
        "cryptography": version("cryptography"),
        "protobuf": version("protobuf"),
        "h2load": h2load.version(),
    }


def _lookup(results: dict[str, Any], path: tuple[str, ...]) -> float | None:
    node: Any = results
    for part in path:
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return float(node) if isinstance(node, int | float) else None


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    checked = []
    for name, path, comparison, bound in TARGETS:
        value = _lookup(results, path)
        met = None if value is None else (value >= bound if comparison == ">=" else value <= bound)
        checked.append({"target": name, "value": value, "bound": f"{comparison} {bound}", "met": met})
    return checked


def run(phases: scenarios.Phases, log: Any) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": _machine(), "phases": phases.__dict__, "started": time.time()}
    if not h2load.available():
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")
    with scenarios.with_scratch() as scratch:
        backends = scenarios.Backends(Path(scratch))
        try:
            log("baseline: AES-GCM in process")
            results["aesgcm_1kib"] = scenarios.aesgcm_baseline(phases)
            results["unary"] = {}
            results["cold_path"] = {}
            results["key_management"] = {}
            for backend, levels in (("embedded", (1, 16, 64)), ("mongo_redis", phases.backends_in_flight)):
                with scenarios.bench_server(backends.env(backend, f"main-{backend}")) as (server,):
                    log(f"unary Encrypt/Decrypt vs empty RPC, {backend}")
                    results["unary"][backend] = scenarios.unary(server.address, phases, levels)
                    if backend == "embedded":
                        log("python client cross-check")
                        results["python_client_cross_check"] = scenarios.python_cross_check(server.address, phases)
                    log(f"cold path, {backend}")
                    results["cold_path"][backend] = scenarios.cold_path(server.address, phases)
                    log(f"key management, {backend}")
                    results["key_management"][backend] = scenarios.key_management(server.address, phases)
            results["backend_ratio_16"] = (
                results["unary"]["mongo_redis"]["16"]["encrypt"]["rps"]["median"]
                / results["unary"]["embedded"]["16"]["encrypt"]["rps"]["median"]
            )
            log("cold tenants after a restart, file vs HSM root key")
            results["cold_tenants"] = scenarios.cold_tenants(backends, phases)
            log("large data")
            results["large_data"] = _large_data(backends, phases)
            log("scale-out")
            results["scale_out"] = scenarios.scale_out(backends, phases)
            log("audit trail cost")
            results["audit"] = scenarios.audit_cost(backends, phases)
            if phases is scenarios.FULL:  # about a minute: the full run only (python -m bench --access-log alone)
                log("access log modes")
                results["access_log"] = scenarios.access_log_cost(backends, phases)
            log("mTLS + access policy + audit, against none of them")
            security_scratch = Path(scratch) / "security"
            security_scratch.mkdir()
            results["security"] = scenarios.security_cost(backends, phases, security_scratch)
            if phases.against_history:
                log("key lifecycle (usage counting, rotator): today's server against the one before issue 13")
                results["lifecycle"] = scenarios.lifecycle_cost(backends, phases, Path(scratch))
                log("batches of 100 x 1 KiB against unary Encrypt, today's server and the one before the rework")
                results["batches"] = scenarios.batch_cost(backends, phases, Path(scratch))
            if (
                phases.aging_versions and phases is not scenarios.QUICK
            ):  # ~9 s: python -m bench --only key_aging --quick
                log("key aging: RotateKey, GetKey and a cold Encrypt at each version count")
                results["key_aging"] = scenarios.key_aging(backends, phases)
            if phases.key_counts:
                log("key count: CreateKey/s and a ListKeys page at each number of keys in a tenant")
                results["key_count"] = scenarios.key_count(backends, phases)
        finally:
            backends.stop()
    results["targets"] = _targets(results)
    results["finished"] = time.time()
    return results


def run_access_log(phases: scenarios.Phases, log: Any) -> dict[str, Any]:
    """Only the access log scenario (it is left out of the quick run, which must stay under a minute)."""
    results: dict[str, Any] = {"machine": _machine(), "phases": phases.__dict__, "started": time.time()}
    if not h2load.available():
        raise SystemExit("h2load is missing: apt-get install nghttp2-client")
    with scenarios.with_scratch() as scratch:
        backends = scenarios.Backends(Path(scratch))
        try:
            log("access log modes")
            results["access_log"] = scenarios.access_log_cost(backends, phases)
        finally:
            backends.stop()
    results["finished"] = time.time()
    return results


def _unary(backends: scenarios.Backends, phases: scenarios.Phases) -> dict[str, Any]:
    """Scenario 1/2 alone: the unary calls and their floor, embedded (1, 16, 64 in flight) and MongoDB + Redis."""
    results: dict[str, Any] = {}
    for backend, levels in (("embedded", (1, 16, 64)), ("mongo_redis", phases.backends_in_flight)):
        with scenarios.bench_server(backends.env(backend, f"unary-{backend}")) as (server,):
            results[backend] = scenarios.unary(server.address, phases, levels)
    return results


def _large_data(backends: scenarios.Backends, phases: scenarios.Phases) -> dict[str, Any]:
    """Scenario 4: streams and files through the client against the echo stream; the largest size's ratios."""
    with (
        scenarios.with_scratch() as scratch,
        scenarios.in_memory_files(Path(scratch)) as files,
        scenarios.bench_server(backends.env("embedded", "large")) as servers,
    ):
        results = scenarios.large_data(servers, phases, files)
    largest = results[f"{phases.large_sizes_mib[-1]}MiB"]
    for call in ("encrypt", "decrypt", "encrypt_file", "decrypt_file"):
        results[f"largest_{call}_ratio_to_echo"] = largest[f"{call}_ratio_to_echo"]
    results["largest_ratio_to_echo"] = largest["ratio_to_echo"]
    return results


# The scenarios `--only` runs alone: each takes (backends, phases).
ONLY: dict[str, Callable[[scenarios.Backends, scenarios.Phases], dict[str, Any]]] = {
    "unary": _unary,
    "large_data": _large_data,
    "key_aging": scenarios.key_aging,
    "key_count": scenarios.key_count,
}


def run_only(names: list[str], phases: scenarios.Phases, log: Any) -> dict[str, Any]:
    """Only the scenarios named (`ONLY`), and the targets they measure."""
    results: dict[str, Any] = {"machine": _machine(), "phases": phases.__dict__, "started": time.time()}
    with scenarios.with_scratch() as scratch:
        backends = scenarios.Backends(Path(scratch))
        try:
            for name in names:
                log(name)
                results[name] = ONLY[name](backends, phases)
        finally:
            backends.stop()
    results["targets"] = [target for target in _targets(results) if target["value"] is not None]
    results["finished"] = time.time()
    return results


def only_table(results: dict[str, Any]) -> str:
    lines = [
        f"{'scenario':<44} {'median':>12} {'min':>10} {'max':>10}",
        *unary_table(results),
        *large_data_table(results),
        *key_aging_table(results),
        *key_count_table(results),
    ]
    lines.extend(["", *targets_table(results)])
    return "\n".join(lines)


def _stat_line(name: str, stat: dict[str, Any]) -> str:
    return f"{name:<44} {stat['median']:>12.2f} {stat['min']:>10.2f} {stat['max']:>10.2f}"


def unary_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for backend, levels in results.get("unary", {}).items():
        for level, calls in levels.items():
            for name in ("empty", "floor", "encrypt", "decrypt"):
                lines.append(_stat_line(f"{backend} {name} @{level} rps", calls[name]["rps"]))
                lines.append(_stat_line(f"{backend} {name} @{level} p50 ms", calls[name]["p50_ms"]))
                lines.append(_stat_line(f"{backend} {name} @{level} p99 ms", calls[name]["p99_ms"]))
            for name in ("floor", "encrypt", "decrypt"):
                label = f"{backend} {name} / empty rps @{level}"
                lines.append(f"{label:<44} {calls[name]['rps_ratio_to_empty']:>12.2f}")
            label = f"{backend} encrypt / floor rps @{level}"
            lines.append(f"{label:<44} {calls['encrypt']['rps_ratio_to_floor']:>12.2f}")
    return lines


def large_data_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for size, figures in results.get("large_data", {}).items():
        if isinstance(figures, dict):
            for call in ("echo", "encrypt", "decrypt", "encrypt_file", "decrypt_file"):
                lines.append(_stat_line(f"large {size} {call} MB/s", figures[f"{call}_mb_s"]))
                lines.append(_stat_line(f"large {size} {call} server ms/MiB", figures[f"{call}_server_ms_per_mib"]))
    return lines


def key_aging_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for backend, figures in results.get("key_aging", {}).items():
        if not isinstance(figures, dict):
            continue
        for count, at in figures.items():
            if not isinstance(at, dict) or "versions" not in at:
                continue
            label = f"{backend} {int(count):,} versions:"
            lines.append(f"{label + ' RotateKey/s':<44} {at['rotate_per_s']:>12.2f}")
            at_8 = at["rotate_per_s_8_in_flight"]
            at_8_text = f"{at_8:>12.2f}" if at_8 is not None else f"{at.get('rotate_error_8_in_flight', 'n/a'):>12}"
            lines.append(f"{label + ' RotateKey/s @8':<44} {at_8_text}")
            lines.append(_stat_line(f"{label} GetKey ms", at["get_key_ms"]))
            lines.append(f"{label + ' GetKey bytes':<44} {at['get_key_bytes']:>12,}")
            lines.append(_stat_line(f"{label} cold Encrypt ms", at["cold_encrypt_ms"]))
        most, fewest = figures["largest_versions"], figures["baseline_versions"]
        for figure, ratio in figures["largest_to_baseline"].items():
            label = f"{backend} {figure} {most:,} / {fewest:,}"
            lines.append(f"{label:<44} {ratio:>12.2f}" if ratio is not None else f"{label:<44} {'n/a':>12}")
    return lines


def key_count_table(results: dict[str, Any]) -> list[str]:
    lines = []
    for backend, figures in results.get("key_count", {}).items():
        if not isinstance(figures, dict):
            continue
        for count, at in figures.items():
            label = f"{backend} {int(count):,} keys:"
            lines.append(f"{label + ' CreateKey/s':<44} {at['create_per_s']:>12.2f}")
            lines.append(_stat_line(f"{label} ListKeys first ms", at["list_first_page_ms"]))
            lines.append(_stat_line(f"{label} ListKeys 90% ms", at["list_deep_page_ms"]))
    return lines


def targets_table(results: dict[str, Any]) -> list[str]:
    lines = [f"{'target':<48} {'value':>10}  {'bound':<8} met"]
    for target in results["targets"]:
        value = "n/a" if target["value"] is None else f"{target['value']:.3f}"
        lines.append(f"{target['target']:<48} {value:>10}  {target['bound']:<8} {target['met']}")
    return lines


def access_log_table(results: dict[str, Any]) -> list[str]:
    lines = [f"{'access log (embedded)':<44} {'median':>12} {'min':>10} {'max':>10}"]
    figures = results.get("access_log", {})
    for level in ("16", "64"):
        for name in figures.get(level, {}):
            for figure in ("encrypt", "empty", "encrypt_to_empty", "encrypt_rps_ratio_to_all"):
                stat = figures[level][name][figure]
                label = f"access log {name} @{level} {figure}"
                lines.append(f"{label:<44} {stat['median']:>12.3f} {stat['min']:>10.3f} {stat['max']:>10.3f}")
    if "load_generator_cpu" in figures:
        stat = figures["load_generator_cpu"]
        label = "access log: h2load CPU (cores)"
        lines.append(f"{label:<44} {stat['median']:>12.3f} {stat['min']:>10.3f} {stat['max']:>10.3f}")
    return lines


def table(results: dict[str, Any]) -> str:
    lines = [f"{'scenario':<44} {'median':>12} {'min':>10} {'max':>10}"]

    def row(name: str, stat: dict[str, Any], unit: str = "") -> None:
        lines.append(f"{name:<44} {stat['median']:>12.2f} {stat['min']:>10.2f} {stat['max']:>10.2f} {unit}")

    row("AES-GCM 1 KiB in process (ops/s)", results["aesgcm_1kib"]["ops_per_s"])
    lines.extend(unary_table(results))
    check = results["python_client_cross_check"]
    row("python client: empty @16 rps", check["empty_rps"])
    row("python client: encrypt @16 rps", check["encrypt_rps"])
    for backend, cold in results["cold_path"].items():
        row(f"{backend} cold path (keys/s)", cold["keys_per_s"])
    for root in ("file", "hsm"):
        figures = results["cold_tenants"][root]
        if "cold_keys_per_s" in figures:
            row(f"{root} root: cold tenants after restart (keys/s)", figures["cold_keys_per_s"])
            row(f"{root} root: the same keys warm (keys/s)", figures["warm_keys_per_s"])
    for phase in ("cold", "warm"):
        ratio = results["cold_tenants"].get(f"hsm_to_file_{phase}_ratio")
        if ratio is not None:
            lines.append(f"{'HSM / file root, ' + phase + ' tenants':<44} {ratio:>12.2f}")
    for backend, management in results["key_management"].items():
        row(f"{backend} CreateKey/s", management["create_per_s"])
        row(f"{backend} RotateKey/s", management["rotate_per_s"])
    lines.extend(large_data_table(results))
    for processes in ("1_process", "2_process"):
        row(f"scale-out {processes} encrypt rps", results["scale_out"][processes]["encrypt_rps"])
    for mode in scenarios.AUDIT_MODES:
        row(f"audit {mode}: encrypt @16 rps", results["audit"][mode]["rps"])
    if "access_log" in results:
        lines.extend(access_log_table(results))
    for mode in ("plain", "mtls_policy_audit"):
        row(f"security {mode}: encrypt @16 rps (python client)", results["security"][mode]["rps"])
    lifecycle = results.get("lifecycle", {})
    for level in ("16", "64"):
        if level in lifecycle:
            for name in ("before", "now"):
                row(f"lifecycle {name}: encrypt @{level} rps", lifecycle[level][name]["encrypt"])
            ratio = lifecycle[level]["encrypt_rps_ratio_now_to_before"]
            lines.append(f"{'lifecycle now / before, encrypt @' + level:<44} {ratio:>12.2f}")
    batches = results.get("batches", {})
    for level in ("16", "64"):
        for name in ("before", "now"):
            figures = batches.get(level, {}).get(name)
            if figures is None:
                continue
            row(f"batches {name}: encrypt @{level} rps", figures["encrypt_rps"])
            for call in ("batch_encrypt", "batch_decrypt"):
                row(f"batches {name}: {call} @{level} items/s", figures[f"{call}_items_per_s"])
                ratio = figures[f"{call}_ratio_to_encrypt"]
                lines.append(f"{'batches ' + name + ': ' + call + ' / encrypt @' + level:<44} {ratio:>12.2f}")
    lines.extend(key_aging_table(results))
    lines.extend(key_count_table(results))
    lines.append("")
    lines.extend(targets_table(results))
    return "\n".join(lines)


def _aging_versions(value: str) -> tuple[str, tuple[int, ...]]:
    """`embedded=10,1000,10000`: a backend and its version counts, the smallest first."""
    backend, _, counts = value.partition("=")
    try:
        parsed = tuple(int(count) for count in counts.split(","))
    except ValueError:
        parsed = ()
    if (
        backend not in ("embedded", "mongo_redis")
        or len(parsed) < 2
        or list(parsed) != sorted(set(parsed))
        or parsed[0] < 1
    ):
        raise argparse.ArgumentTypeError(f"{value!r}: want embedded|mongo_redis=N,N,... (at least two, increasing)")
    return backend, parsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter phases (under a minute)")
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--access-log", action="store_true", help="only the access log modes' cost")
    parser.add_argument("--only", action="append", choices=sorted(ONLY), help="only this scenario (repeatable)")
    parser.add_argument(
        "--aging-versions",
        action="append",
        type=_aging_versions,
        metavar="BACKEND=N,N,...",
        help="key_aging's version counts on a backend (repeatable); only these backends are measured",
    )
    args = parser.parse_args()
    phases = scenarios.QUICK if args.quick else scenarios.FULL
    if args.aging_versions:
        phases = dataclasses.replace(phases, aging_versions=tuple(args.aging_versions))
    if args.only:
        names = list(dict.fromkeys(args.only))
        out = args.out or Path("bench/results") / f"{'+'.join(names)}.json"
        return run_and_report(lambda p, log: run_only(names, p, log), only_table, phases, out)
    default_name = "quick.json" if args.quick else "latest.json"
    out = args.out or Path("bench/results") / ("access-log.json" if args.access_log else default_name)
    if args.access_log:
        return run_and_report(run_access_log, lambda results: "\n".join(access_log_table(results)), phases, out)
    return run_and_report(run, table, phases, out)


if __name__ == "__main__":
    raise SystemExit(main())
