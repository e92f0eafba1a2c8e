"""What ships: the image is pinned, runs as an unprivileged user under an init process and
installs its dependencies from a lock file with hashes; the licence is the one declared."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def _requirement_names(lines: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in lines}


def test_the_image_is_pinned_unprivileged_and_under_an_init_process() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    image = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", dockerfile, re.MULTILINE)
    assert image is not None
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}", image.group(1))
    assert dockerfile.count("FROM ${PYTHON_IMAGE}") == 2
    assert 'ENTRYPOINT ["tini", "--", "kaiko-bridge"]' in dockerfile
    assert "USER 10001:10001" in dockerfile
    assert "pip install --no-cache-dir --require-hashes -r" in dockerfile
    for label in ("title", "description", "licenses", "version", "revision"):
        assert f"org.opencontainers.image.{label}=" in dockerfile


def test_the_lock_files_pin_every_dependency_with_hashes() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _requirement_names(project["dependencies"] + project["optional-dependencies"]["fast"])
    for name, extra in (("requirements.lock", set()), ("requirements-sim.lock", {"trustme"})):
        text = (ROOT / name).read_text()
        pinned = dict(re.findall(r"^([a-z0-9_.\-]+)==(\S+) \\$", text, re.MULTILINE))
        assert wanted | extra <= set(pinned), (name, sorted(wanted | extra - set(pinned)))
        blocks = re.split(r"\n(?=[a-z0-9])", text.split("\n", 7)[-1])
        for block in blocks:
            if "==" in block:
                assert "--hash=sha256:" in block, block.splitlines()[0]


def test_every_compose_service_runs_unprivileged_with_a_healthcheck() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        user = str(service.get("user", ""))
        assert user, name
        assert user.split(":", maxsplit=1)[0] not in ("0", "root"), name
        assert "test" in service.get("healthcheck", {}), name


def test_the_licence_is_the_one_declared() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text
    assert "Version 2.0, January 2004" in text


def test_the_readme_names_what_a_fresh_machine_needs() -> None:
    opening = (ROOT / "README.md").read_text().split("## ", 1)[0]
    for tool in ("Python 3.11", "Java 17", "Maven", "Go"):
        assert tool in opening, tool
