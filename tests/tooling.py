"""Helpers the unit tests share: a registry read as Prometheus would scrape it, and the
tools built from the Go module proxy into `.cache/bin` (Helm, promtool)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy" / "helm" / "kaiko-bridge"
#: The schemas `kubernetes-validate` checks against: the release `make kube` builds.
K8S_SCHEMA_VERSION = "1.37.0"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(registry: CollectorRegistry) -> Samples:
    """Every sample of `registry`'s exposition, by name and sorted labels."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def built_tool(name: str) -> str:
    """The path of `name` (`BRIDGE_<NAME>`, the PATH, or `.cache/bin`); skipped when it is
    missing, but a failure in CI, where `make <name>` has built it."""
    found = os.environ.get(f"BRIDGE_{name.upper()}") or shutil.which(name)
    local = ROOT / ".cache" / "bin" / name
    if found is None and local.exists():
        found = str(local)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing: `make {name}` builds it")
        pytest.skip(f"{name} is not installed (`make {name}`)")
    return found
