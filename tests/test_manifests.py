"""The Kubernetes manifests and the Prometheus alert rules in deploy/, checked offline.

Manifests: `kubernetes-validate` (its JSON schemas ship in the package) in strict mode, for the oldest
Kubernetes version we support and its own newest one; then the settings the service relies on.
Alert rules: no PyPI package ships promtool, so the rule file's structure is checked here as `promtool check
rules` would, and every expression is parsed by `promql-parser` (the Rust PromQL parser's Python binding).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

from crypto_server.transport.authorization import parse_policy

ROOT = Path(__file__).resolve().parent.parent
KUBERNETES = ROOT / "deploy" / "kubernetes"
RULES = ROOT / "deploy" / "prometheus"
VALIDATE = str(Path(sys.executable).parent / "kubernetes-validate")
OLDEST_SUPPORTED_KUBERNETES = "1.30.0"  # the gRPC probes went GA in 1.27; HPA v2 and PDB v1 long before


def _manifests() -> dict[str, dict[str, Any]]:
    documents = [doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
    return {doc["kind"]: doc for doc in documents if doc}


@pytest.mark.parametrize("version", [OLDEST_SUPPORTED_KUBERNETES, None])
def test_the_manifests_validate_against_the_kubernetes_schemas(version: str | None) -> None:
    files = [str(path) for path in sorted(KUBERNETES.glob("*.yaml"))]
    command = [VALIDATE, "--strict", "--quiet", *(["-k", version] if version else []), *files]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_refuses_a_broken_manifest(tmp_path: Path) -> None:
    broken = (KUBERNETES / "deployment.yaml").read_text().replace("readOnlyRootFilesystem", "readOnlyRootFileSystem")
    (tmp_path / "deployment.yaml").write_text(broken)
    result = subprocess.run([VALIDATE, "--strict", str(tmp_path / "deployment.yaml")], capture_output=True, text=True)
    assert result.returncode != 0


def test_the_deployment_runs_locked_down_with_native_grpc_probes() -> None:
    manifests = _manifests()
    assert set(manifests) >= {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    }
    pod = manifests["Deployment"]["spec"]["template"]
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001 and security["fsGroup"] == 10001
    (container,) = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == 3010, probe  # the plaintext health port
    assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == "9109"


def test_the_root_key_is_a_secret_volume_the_server_accepts() -> None:
    pod = _manifests()["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "caas-crypto-root-key"]
    # 0400 plus fsGroup becomes root:10001 0440 on the node: root-owned and group-readable is what
    # crypto_server/root_key.py accepts besides owner-only (tests/test_root_key.py proves that rule).
    assert volume["secret"]["defaultMode"] == 0o400
    (container,) = pod["containers"]
    mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
    environment = {e["name"]: e for e in container["env"]}
    item = volume["secret"]["items"][0]["path"]
    assert environment["CRYPTO_ROOT_KEY_FILE"]["value"] == f"{mount['mountPath']}/{item}"
    assert "CRYPTO_ROOT_KEY" not in environment
    assert "secretKeyRef" in environment["MONGODB_URI"]["valueFrom"], "credentials come from a Secret"


def test_only_labelled_clients_reach_the_grpc_port() -> None:
    manifests = _manifests()
    policy = manifests["NetworkPolicy"]["spec"]
    grpc_rule = next(rule for rule in policy["ingress"] if rule["ports"][0]["port"] == 3009)
    assert grpc_rule["from"] == [
        {"namespaceSelector": {}, "podSelector": {"matchLabels": {"caas-crypto/client": "true"}}}
    ]
    assert policy["podSelector"] == manifests["Deployment"]["spec"]["selector"]
    assert manifests["PodDisruptionBudget"]["spec"]["maxUnavailable"] == 1
    assert manifests["HorizontalPodAutoscaler"]["spec"]["minReplicas"] >= 2


# -- Prometheus alert rules ------------------------------------------------------------------------------

_RULE_KEYS = {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}
_DURATION = re.compile(r"^(\d+(ms|s|m|h|d|w|y))+$")


def _rule_files() -> list[Path]:
    return sorted(RULES.glob("*.yaml"))


def _documented_series() -> set[str]:
    source = (ROOT / "crypto_server" / "transport" / "metrics.py").read_text()
    return {_series(name) for name in re.findall(r"^\| (caas_crypto_\w+) \|", source, re.M)}


def _series(name: str) -> str:
    return re.sub(r"_(total|bucket|count|sum)$", "", name)


@pytest.mark.parametrize("path", _rule_files(), ids=lambda p: p.name)
def test_alert_rules_are_well_formed_and_their_promql_parses(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    assert set(document) == {"groups"}
    names = [group["name"] for group in document["groups"]]
    assert len(names) == len(set(names)), "group names must be unique"
    for group in document["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for rule in group["rules"]:
            assert set(rule) <= _RULE_KEYS and {"alert", "expr"} <= set(rule), rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            promql_parser.parse(rule["expr"])  # raises ValueError on a syntax error
            assert "for" not in rule or _DURATION.match(rule["for"]), rule["for"]
            assert all(isinstance(v, str) for v in {**rule.get("labels", {}), **rule.get("annotations", {})}.values())
            assert rule["labels"]["severity"] in {"critical", "warning", "info"}
            used = set(re.findall(r"\bcaas_crypto_\w+", rule["expr"]))
            series = {_series(name) for name in used}
            assert series <= _documented_series(), f"{rule['alert']} uses undocumented series {series}"


def test_the_promql_check_can_fail() -> None:
    with pytest.raises(ValueError, match="parenthesis"):
        promql_parser.parse("sum(rate(caas_crypto_rpc_total[5m])")


def test_the_deployment_serves_mtls_with_a_policy_and_probes_the_plaintext_health_port() -> None:
    """Reachable from other pods, the server refuses to start without TLS and a policy: the manifest gives both."""
    documents = {
        doc["kind"]: doc for path in sorted(KUBERNETES.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())
    }
    container = documents["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    env = {item["name"]: item.get("value") for item in container["env"]}
    for name in ("CRYPTO_TLS_CERT_FILE", "CRYPTO_TLS_KEY_FILE", "CRYPTO_TLS_CLIENT_CA_FILE", "CRYPTO_POLICY_FILE"):
        assert env[name], name
    assert "CRYPTO_ALLOW_INSECURE" not in env
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["grpc"]["port"] == int(env["CRYPTO_HEALTH_PORT"])
    policy = documents["ConfigMap"]["data"]["policy.yaml"]
    parse_policy(policy.encode())  # the server would accept it
