"""The Helm chart renders, validates against the Kubernetes schemas, and runs restricted."""

from __future__ import annotations

import json
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bridge.configfile import parse_settings
from bridgedev.kube import render_chart
from tests.tooling import CHART, K8S_SCHEMA_VERSION, built_tool


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    out = render_chart(built_tool("helm"), CHART)  # every optional part on
    return [doc for doc in yaml.safe_load_all(out) if doc]


def test_every_resource_validates(rendered: list[dict[str, Any]]) -> None:
    kinds = set()
    for doc in rendered:
        kinds.add(doc["kind"])
        if doc["kind"] in ("ServiceMonitor", "PrometheusRule"):
            continue  # CRDs: not in the core schemas
        kubernetes_validate.validate(doc, K8S_SCHEMA_VERSION, strict=True)
    assert kinds == {
        "ConfigMap",
        "StatefulSet",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    }


def test_pod_runs_with_the_restricted_profile(rendered: list[dict[str, Any]]) -> None:
    (statefulset,) = [d for d in rendered if d["kind"] == "StatefulSet"]
    pod = statefulset["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # secrets come as files, never environment variables: the pod name is the one value
    (env,) = container["env"]
    assert env["name"] == "KAIKO_BRIDGE__SHARDS__INSTANCE_ID"
    assert env["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    secret_volumes = [v for v in pod["volumes"] if "secret" in v]
    assert secret_volumes


def test_replicas_roll_one_at_a_time_spread_and_keep_a_quorum(
    rendered: list[dict[str, Any]],
) -> None:
    (statefulset,) = [d for d in rendered if d["kind"] == "StatefulSet"]
    spec = statefulset["spec"]
    assert spec["replicas"] == 3
    assert spec["updateStrategy"] == {"type": "RollingUpdate"}
    services = {d["metadata"]["name"]: d for d in rendered if d["kind"] == "Service"}
    assert services[spec["serviceName"]]["spec"]["clusterIP"] == "None"
    anti = spec["template"]["spec"]["affinity"]["podAntiAffinity"]
    (term,) = anti["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    assert (
        term["podAffinityTerm"]["labelSelector"]["matchLabels"] == spec["selector"]["matchLabels"]
    )
    (pdb,) = [d for d in rendered if d["kind"] == "PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1  # two of three keep every shard held


def test_configmap_holds_a_valid_config_without_secrets(rendered: list[dict[str, Any]]) -> None:
    (configmap,) = [d for d in rendered if d["kind"] == "ConfigMap" and "config.yaml" in d["data"]]
    config = yaml.safe_load(configmap["data"]["config.yaml"])
    # The secret files exist only in a pod; stand in for them.
    environ = {
        f"KAIKO_BRIDGE__{k}": "x"
        for k in (
            "KAFKA__SASL_PASSWORD",
            "KAFKA__SSL_CAFILE",
            "VINTER__TOKEN",
            "VINTER__API_KEY",
            "KAIKO__API_KEY",
        )
    }
    settings = parse_settings(config, environ=environ)
    assert settings.ops.port == 8080
    for section in ("vinter", "kaiko"):
        for value in config[section].values():
            assert not (isinstance(value, str) and "SENTINEL" in value)
    assert config["kafka"]["sasl_password"] == {
        "file": "/var/run/secrets/kaiko-bridge/kafka-password"
    }


def test_the_alerts_and_the_dashboard_ship_as_written(rendered: list[dict[str, Any]]) -> None:
    (rule,) = [d for d in rendered if d["kind"] == "PrometheusRule"]
    assert rule["spec"] == yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    (board,) = [d for d in rendered if d["kind"] == "ConfigMap" and "config.yaml" not in d["data"]]
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"  # the sidecar's label
    shipped = json.loads(board["data"]["kaiko-bridge.json"])
    assert shipped == json.loads((CHART / "files" / "dashboard.json").read_text())
