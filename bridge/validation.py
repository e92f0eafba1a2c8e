"""JSON Schemas of the events, loaded from the package and compiled once into validators.

Schemas live in `bridge/schemas/<event type>/<version>.json` (JSON Schema 2020-12) and ship
inside the wheel, so consumers in any language can read the same files.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from typing import Any

import jsonschema_rs

SCHEMA_PACKAGE = "bridge.schemas"


def schema_id(event_type: str, version: int) -> str:
    """The `dataschema` URI that names one schema version."""
    return f"urn:kaiko-bridge:schema:{event_type}:{version}"


def _schema_root() -> Any:
    return resources.files("bridge").joinpath("schemas")


def available() -> dict[str, list[int]]:
    """Every event type shipped, with its versions in ascending order."""
    found: dict[str, list[int]] = {}
    for type_dir in _schema_root().iterdir():
        if not type_dir.is_dir():
            continue
        versions = sorted(
            int(f.name.removesuffix(".json"))
            for f in type_dir.iterdir()
            if f.name.endswith(".json") and f.name.removesuffix(".json").isdigit()
        )
        if versions:
            found[type_dir.name] = versions
    return dict(sorted(found.items()))


def latest_version(event_type: str) -> int:
    versions = available().get(event_type)
    if not versions:
        raise KeyError(f"no schema for event type {event_type!r}")
    return versions[-1]


@cache
def load_schema(event_type: str, version: int) -> dict[str, Any]:
    path = _schema_root().joinpath(event_type, f"{version}.json")
    try:
        schema: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyError(f"no schema {event_type} v{version}") from None
    return schema


@cache
def validator(event_type: str, version: int) -> Any:
    """A compiled validator for one schema version (cached: compile once per process)."""
    return jsonschema_rs.Draft202012Validator(load_schema(event_type, version))


def first_error(event_type: str, version: int, instance: Any) -> str | None:
    """None when `instance` is valid, else a one-line description of the first violation."""
    return first_violation(validator(event_type, version), instance)


def first_violation(check: Any, instance: Any) -> str | None:
    """`first_error` with a compiled validator of the caller's (a registry's own schemas)."""
    if check.is_valid(instance):
        return None
    for error in check.iter_errors(instance):
        where = "/".join(str(p) for p in error.instance_path) or "(root)"
        return f"{where}: {error.message}"
    return "invalid"
