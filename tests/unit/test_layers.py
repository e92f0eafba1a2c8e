"""The pipeline's layers, as the code's imports draw them: source -> decoder -> sink -> Kafka,
never back. Read from the source files (imports under `TYPE_CHECKING` do not count: they
are types, not calls)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
KAFKA = ("aiokafka", "bridge.publish", "bridge.kafka", "bridge.state", "bridge.aiokafka_internals")


def runtime_imports(path: Path) -> set[str]:
    """The modules `path` imports when it runs."""
    tree = ast.parse(path.read_text())
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            typing_only |= {id(n) for child in node.body for n in ast.walk(child)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def modules(package: str) -> list[Path]:
    return sorted((ROOT / "bridge" / package).glob("*.py"))


def reaching(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(
        name
        for name in runtime_imports(path)
        if any(name == p or name.startswith(p + ".") for p in prefixes)
    )


@pytest.mark.parametrize("path", modules("normalize"), ids=lambda p: p.name)
def test_decoders_import_no_source_no_sink_and_no_kafka(path: Path) -> None:
    assert reaching(path, ("bridge.sources", "bridge.sink", *KAFKA)) == []


@pytest.mark.parametrize("path", modules("sources"), ids=lambda p: p.name)
def test_sources_import_no_kafka_client(path: Path) -> None:
    assert reaching(path, KAFKA) == []


@pytest.mark.parametrize("path", modules("sink"), ids=lambda p: p.name)
def test_the_sink_never_reaches_back_into_a_source(path: Path) -> None:
    assert reaching(path, ("bridge.sources",)) == []


def test_the_check_sees_an_import_it_must_refuse(tmp_path: Path) -> None:
    """The reader counts runtime imports and leaves type-only ones out."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "from bridge.publish import Publisher\n"
        "if TYPE_CHECKING:\n"
        "    from bridge.kafka import admin_client\n"
    )
    assert reaching(probe, KAFKA) == ["bridge.publish"]
