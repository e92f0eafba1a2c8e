"""The chart's alert rules pass `promtool check rules` and their unit tests
(`deploy/prometheus/alerts_test.yaml`), and every metric the alerts and the dashboard query
is one the bridge exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

from bridge import freshness, metrics
from tests.tooling import built_tool

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "helm" / "kaiko-bridge" / "files" / "alerts.yaml"
DASHBOARD = ROOT / "deploy" / "helm" / "kaiko-bridge" / "files" / "dashboard.json"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
REGISTERING = (metrics, freshness)  # importing them registers what the service exports


def test_the_rules_are_valid_and_their_unit_tests_pass() -> None:
    tool = built_tool("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        run = subprocess.run([tool, *args], capture_output=True, text=True, check=False)
        assert run.returncode == 0, run.stdout + run.stderr


def exported() -> set[str]:
    """The sample names the bridge's registry exposes (counters with `_total`)."""
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        names |= {sample.name for sample in family.samples}
        if family.type == "counter":
            names.add(family.name + "_total")
    return names


def queried() -> set[str]:
    exprs = [
        rule["expr"]
        for group in yaml.safe_load(ALERTS.read_text())["groups"]
        for rule in group["rules"]
    ]
    board = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for panel in board["panels"] for t in panel["targets"]]
    return {name for expr in exprs for name in re.findall(r"\bbridge_[a-z_]+", expr)}


def test_every_metric_queried_is_one_the_bridge_exports() -> None:
    used = queried()
    assert "bridge_subscription_last_published_timestamp_seconds" in used
    assert used <= exported(), sorted(used - exported())
