"""The chart against a real kube-apiserver and etcd on loopback (`make kube` builds them):
every rendered object passes a server-side dry run with strict field validation, a wrong
field fails both there and in `kubernetes-validate --strict`, and a wrong field in the
PrometheusRule, which no offline schema covers, fails on the server."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from bridgedev.kube import NAMESPACE, KubeAPIServer, missing, render_chart, running_server
from tests.tooling import CHART, K8S_SCHEMA_VERSION, built_tool

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server() -> Iterator[KubeAPIServer]:
    gone = missing()
    if gone:  # CI says so too: .ci/run prints what is not cached
        pytest.skip(f"not cached: {', '.join(gone)} (`make kube` builds them, ~10 minutes)")
    with running_server() as server:
        server.install_crds()
        server.create_namespace()
        yield server


def _documents(manifests: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(manifests) if doc]


def _chart_with(tmp_path: Path, file: str, anchor: str, insert: str) -> Path:
    """A copy of the chart with `insert` put right after `anchor` in `file`."""
    chart = tmp_path / "chart"
    shutil.copytree(CHART, chart)
    path = chart / file
    text = path.read_text()
    assert anchor in text, f"{file} changed: update this test's anchor"
    path.write_text(text.replace(anchor, anchor + insert, 1))
    return chart


def test_every_rendered_object_passes_a_server_side_dry_run(server: KubeAPIServer) -> None:
    manifests = render_chart(built_tool("helm"), CHART)
    applied = server.dry_run(manifests)
    assert applied.returncode == 0, applied.output
    lines = applied.output.splitlines()
    assert len(lines) == len(_documents(manifests)), applied.output
    assert all(line.endswith("serverside-applied (server dry run)") for line in lines), lines
    kinds = {line.split("/")[0] for line in lines}
    assert {"statefulset.apps", "prometheusrule.monitoring.coreos.com"} <= kinds
    stored = server.kubectl("get", "statefulsets,prometheusrules", "-n", NAMESPACE, "-o", "name")
    assert stored.returncode == 0, stored.output
    assert stored.output == "", "a dry run stored objects"


def test_a_wrong_field_in_a_template_fails_offline_and_on_the_server(
    server: KubeAPIServer, tmp_path: Path
) -> None:
    chart = _chart_with(
        tmp_path,
        "templates/statefulset.yaml",
        "      automountServiceAccountToken: false\n",
        "      terminationGracePeriod: 30\n",  # the field is terminationGracePeriodSeconds
    )
    manifests = render_chart(built_tool("helm"), chart)
    (statefulset,) = [d for d in _documents(manifests) if d["kind"] == "StatefulSet"]
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriod"):
        kubernetes_validate.validate(statefulset, K8S_SCHEMA_VERSION, strict=True)
    applied = server.dry_run(manifests)
    assert applied.returncode != 0
    refusal = ".spec.template.spec.terminationGracePeriod: field not declared in schema"
    assert refusal in applied.output, applied.output


def test_a_wrong_field_in_the_prometheus_rule_fails_on_the_server(
    server: KubeAPIServer, tmp_path: Path
) -> None:
    chart = _chart_with(tmp_path, "files/alerts.yaml", "        for: 1m\n", "        fro: 1m\n")
    applied = server.dry_run(render_chart(built_tool("helm"), chart))
    assert applied.returncode != 0
    refusal = '.spec.groups[name="kaiko-bridge"].rules[0].fro: field not declared in schema'
    assert refusal in applied.output, applied.output
