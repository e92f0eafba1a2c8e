"""The wheel a user installs, in a fresh virtualenv outside the checkout: it carries every
schema, checks a configuration, lists the schemas, and says where the demo runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from bridge import validation

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def run(*argv: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh virtualenv with the wheel of this checkout."""
    work = tmp_path_factory.mktemp("wheel")
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", work, ROOT, cwd=work)
    assert built.returncode == 0, built.stderr
    assert "Warning" not in built.stderr, built.stderr
    [wheel] = work.glob("kaiko_bridge-*.whl")
    (work / "wheel-files.txt").write_text("\n".join(zipfile.ZipFile(wheel).namelist()))
    venv.create(work / "venv", with_pip=True)
    bin_dir = work / "venv" / "bin"
    done = run(bin_dir / "pip", "install", "--quiet", wheel, cwd=work)
    assert done.returncode == 0, done.stderr
    return bin_dir


def test_the_wheel_checks_a_configuration_and_lists_every_schema(
    installed: Path, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    shutil.copy(ROOT / "config" / "example.yaml", config)
    done = run(installed / "kaiko-bridge", "check-config", config, "--skip-files", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "valid (files not read)" in done.stdout
    listed = run(installed / "kaiko-bridge", "schemas", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    shipped = {
        name: ", ".join(map(str, versions)) for name, versions in validation.available().items()
    }
    assert listed.stdout.splitlines() == [f"{n}: versions {v}" for n, v in shipped.items()]
    for name in shipped:
        one = run(installed / "kaiko-bridge", "schemas", name, cwd=tmp_path)
        assert one.returncode == 0, (name, one.stderr)


def test_the_wheel_says_in_one_line_where_the_demo_runs(installed: Path, tmp_path: Path) -> None:
    done = run(installed / "kaiko-bridge", "demo", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert "runs from a checkout of the source" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_wheel_carries_no_development_tooling(installed: Path) -> None:
    """The local broker, the simulators and the demo stay in the checkout (dev/)."""
    files = (installed.parents[1] / "wheel-files.txt").read_text().splitlines()
    runtime = [f for f in files if f.startswith("bridge/")]
    checkout = {
        str(path.relative_to(ROOT)) for path in (ROOT / "bridge").rglob("*.py")
    }  # every module of the service, and nothing else of the checkout
    assert checkout <= set(runtime)
    assert not [f for f in files if f.startswith("bridgedev/")]
    for module in ("localkafka", "demo", "sim"):
        assert not [f for f in runtime if Path(f).stem == module or f"/{module}/" in f], module
    schemas = {f for f in runtime if f.startswith("bridge/schemas/") and f.endswith(".json")}
    assert len(schemas) == sum(len(v) for v in validation.available().values())


def test_the_service_never_imports_the_development_tooling() -> None:
    """Only the CLI's `demo` command reaches into dev/, and only when it runs."""
    importers = [
        path.relative_to(ROOT)
        for path in (ROOT / "bridge").rglob("*.py")
        if "bridgedev" in path.read_text(encoding="utf-8")
    ]
    assert importers == [Path("bridge/cli.py")]
    run_service = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, bridge.app, bridge.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('bridgedev')))",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert run_service.stdout.strip() == "[]"
