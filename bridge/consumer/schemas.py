"""Event schemas by type and version, and the rule for evolving them: what `SchemaRegistry`
holds and checks, and what `schema_changes` calls additive. No Kafka, no events.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jsonschema_rs

from bridge import validation
from bridge.errors import ConfigError

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


# Keywords that describe a schema without constraining it: changing them changes nothing.
ANNOTATIONS = frozenset(
    {"title", "description", "examples", "$comment", "default", "deprecated", "readOnly",
     "writeOnly"}
)  # fmt: skip
# Keywords whose value maps names to subschemas (the names are data, not keywords).
_SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "dependentSchemas"})
_OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties"})


def _strip(schema: Any) -> Any:
    """`schema` without annotations, at any depth."""
    if isinstance(schema, list):
        return [_strip(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for keyword, value in schema.items():
        if keyword in ANNOTATIONS:
            continue
        if keyword in _SCHEMA_MAPS and isinstance(value, dict):
            out[keyword] = {name: _strip(sub) for name, sub in value.items()}
        elif keyword in ("const", "enum"):
            out[keyword] = value
        else:
            out[keyword] = _strip(value)
    return out


def _describe_change(old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        if old.get("type") != new.get("type"):
            return f"type changed from {old.get('type')!r} to {new.get('type')!r}"
        keys = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        return f"changed ({', '.join(keys)})"
    return "changed"


def _is_object(schema: Any) -> bool:
    if not isinstance(schema, dict):
        return False
    kind = schema.get("type")
    return (
        "properties" in schema or kind == "object" or (isinstance(kind, list) and "object" in kind)
    )


def _compare(old: Any, new: Any, path: str, out: list[str]) -> None:
    if not (_is_object(old) and _is_object(new)):
        old_s, new_s = _strip(old), _strip(new)
        if old_s != new_s:
            out.append(f"{path}: {_describe_change(old_s, new_s)}")
        return
    old_props: dict[str, Any] = old.get("properties", {})
    new_props: dict[str, Any] = new.get("properties") or {}
    for name, sub in old_props.items():
        where = f"{path}.{name}" if path != "(root)" else name
        if name not in new_props:
            out.append(f"{where}: removed")
        else:
            _compare(sub, new_props[name], where, out)
    added = sorted(set(new_props) - set(old_props))
    old_extra = old.get("additionalProperties", True)
    new_extra = new.get("additionalProperties", True)
    if added and old_extra is not False:
        out.append(
            f"{path}: new properties {added} in an object that allowed additional properties"
            " (older events may carry those names with another type)"
        )
    old_req, new_req = set(old.get("required", [])), set(new.get("required", []))
    if new_req - old_req:
        out.append(f"{path}: newly required {sorted(new_req - old_req)}")
    if old_req - new_req:
        out.append(f"{path}: no longer required {sorted(old_req - new_req)}")
    if old_extra is not False and new_extra is not True and _strip(new_extra) != _strip(old_extra):
        out.append(f"{path}: additionalProperties tightened")
    old_rest = _strip({k: v for k, v in old.items() if k not in _OBJECT_KEYWORDS})
    new_rest = _strip({k: v for k, v in new.items() if k not in _OBJECT_KEYWORDS})
    for keyword in sorted(old_rest.keys() | new_rest.keys()):
        if old_rest.get(keyword) != new_rest.get(keyword):
            out.append(f"{path}: {keyword} changed")


def _without_version(schema: Mapping[str, Any]) -> dict[str, Any]:
    """A schema with what names its version (`$id`, the `dataschema` constant) taken out."""
    copy = {k: v for k, v in schema.items() if k != "$id"}
    props = copy.get("properties")
    if isinstance(props, dict) and "dataschema" in props:
        copy["properties"] = {**props, "dataschema": {"const": "(version)"}}
    return copy


def schema_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Why `new` is not an additive successor of `old`; empty when it is.

    Additive, checked at every object schema reached through `properties` (the envelope,
    `data`, nested objects):

    1. every property of `old` is in `new` with the same subschema, apart from annotations
       (title, description, ...); object properties are compared by these same rules;
    2. `required` is the same set: nothing new is required (older events stay valid) and
       nothing stops being required (fields a reader of `old` relies on are still there);
    3. `additionalProperties` is not tightened: `false` may stay or open up, an open object
       (absent, `true` or a subschema) stays exactly as open;
    4. new properties appear only where `old` had `additionalProperties: false` (in an open
       object an older event may already carry the name with another type);
    5. every other keyword (`type`, `const`, `enum`, `anyOf`, bounds, patterns, ...) is
       unchanged.

    `$id` and the `dataschema` constant name the version and are not compared. So a new
    version may only add optional fields; anything else is a new event type.
    """
    out: list[str] = []
    _compare(_without_version(old), _without_version(new), "(root)", out)
    return out


def _version_naming(event_type: str, version: int, schema: Mapping[str, Any]) -> list[str]:
    """What is wrong with how a schema file names its own type and version."""
    wanted = validation.schema_id(event_type, version)
    problems = []
    if schema.get("$id") != wanted:
        problems.append(f"$id is {schema.get('$id')!r}, expected {wanted!r}")
    dataschema = schema.get("properties", {}).get("dataschema", {})
    if dataschema.get("const") != wanted:
        problems.append(f"properties.dataschema must be {{'const': {wanted!r}}}")
    return problems


# Upcasters shipped with the package: (event type, from version) -> data of version + 1.
# None yet: every version is additive, which the identity upcasts (see SchemaRegistry).
BUILTIN_UPCASTERS: dict[tuple[str, int], Upcaster] = {}


class SchemaRegistry:
    """Event schemas by type and version, compiled validators, and upcasters.

    Holds the schemas shipped in `bridge/schemas` (unless `builtin=False`) plus those in
    `dirs`, laid out the same way: `<dir>/<event type>/<version>.json`. A version shipped
    once never changes, so an extra directory may add types and versions but not redefine
    one. With `check=True` every type's versions must be consecutive, name themselves in
    `$id` and `dataschema`, and be additive (`schema_changes`); else `ConfigError`.

    Upcasting turns the data of version n into data of version n + 1. A registered function
    does it where a step needs more than the identity (a default value, a derived field);
    a step without one is the identity, which the additive rule makes correct. Either way
    the result is validated against the target version.
    """

    def __init__(
        self,
        dirs: Iterable[str | Path] = (),
        *,
        builtin: bool = True,
        check: bool = True,
    ) -> None:
        self._schemas: dict[str, dict[int, dict[str, Any]]] = {}
        self._builtin: set[tuple[str, int]] = set()
        self._validators: dict[tuple[str, int], Any] = {}
        self._upcasters: dict[tuple[str, int], Upcaster] = {}
        if builtin:
            for event_type, versions in validation.available().items():
                for version in versions:
                    schema = validation.load_schema(event_type, version)
                    self._schemas.setdefault(event_type, {})[version] = schema
                    self._builtin.add((event_type, version))
            self._upcasters.update(BUILTIN_UPCASTERS)
        for directory in dirs:
            self._load_dir(Path(directory))
        if check:
            problems = self.evolution_problems()
            if problems:
                raise ConfigError("schema_dirs", "; ".join(problems))

    def _load_dir(self, directory: Path) -> None:
        if not directory.is_dir():
            raise ConfigError("schema_dirs", f"{directory} is not a directory")
        for type_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
            for path in sorted(type_dir.glob("*.json")):
                if not path.stem.isdigit():
                    continue
                try:
                    schema = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise ConfigError("schema_dirs", f"cannot load {path}: {exc}") from None
                if not isinstance(schema, dict):
                    raise ConfigError("schema_dirs", f"{path} does not hold a JSON object")
                self._add(type_dir.name, int(path.stem), schema, path)

    def _add(self, event_type: str, version: int, schema: dict[str, Any], path: Path) -> None:
        known = self._schemas.get(event_type, {}).get(version)
        if known is not None and known != schema:
            raise ConfigError(
                "schema_dirs",
                f"{path} redefines {event_type} v{version}: a version never changes once"
                " shipped; add the next version instead",
            )
        self._schemas.setdefault(event_type, {})[version] = schema
        self._validators.pop((event_type, version), None)

    # -- lookups ---------------------------------------------------------------------------

    def available(self) -> dict[str, list[int]]:
        """Every event type known, with its versions in ascending order."""
        return {t: sorted(v) for t, v in sorted(self._schemas.items())}

    def versions(self, event_type: str) -> list[int]:
        return sorted(self._schemas.get(event_type, ()))

    def latest(self, event_type: str) -> int:
        versions = self.versions(event_type)
        if not versions:
            raise KeyError(f"no schema for event type {event_type!r}")
        return versions[-1]

    def schema(self, event_type: str, version: int) -> dict[str, Any]:
        try:
            return self._schemas[event_type][version]
        except KeyError:
            raise KeyError(f"no schema {event_type} v{version}") from None

    def knows(self, event_type: str, version: int | None = None) -> bool:
        versions = self._schemas.get(event_type) or {}
        return bool(versions) and (version is None or version in versions)

    def validator(self, event_type: str, version: int) -> Any:
        """The compiled validator of one version (compiled once)."""
        key = (event_type, version)
        if key in self._builtin:
            return validation.validator(event_type, version)  # shared by the whole process
        check = self._validators.get(key)
        if check is None:
            check = jsonschema_rs.Draft202012Validator(self.schema(event_type, version))
            self._validators[key] = check
        return check

    def first_error(self, event_type: str, version: int, instance: Any) -> str | None:
        """None when `instance` is valid, else a one-line description of the first violation."""
        return validation.first_violation(self.validator(event_type, version), instance)

    # -- upcasting -------------------------------------------------------------------------

    def register_upcast(self, event_type: str, from_version: int, upcaster: Upcaster) -> None:
        """Use `upcaster` to turn data of `from_version` into data of `from_version + 1`."""
        self._upcasters[(event_type, from_version)] = upcaster

    def upcaster(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator form of `register_upcast`."""

        def register(upcaster: Upcaster) -> Upcaster:
            self.register_upcast(event_type, from_version, upcaster)
            return upcaster

        return register

    def upcast(self, event_type: str, from_version: int, data: dict[str, Any]) -> dict[str, Any]:
        """Data of `from_version` as data of `from_version + 1` (one step)."""
        step = self._upcasters.get((event_type, from_version))
        return data if step is None else step(data)

    def upcast_to(
        self, event_type: str, from_version: int, to_version: int, data: dict[str, Any]
    ) -> dict[str, Any]:
        """Data of `from_version` as data of `to_version`, one step at a time."""
        for version in range(from_version, to_version):
            data = self.upcast(event_type, version, data)
        return data

    # -- the evolution rule ----------------------------------------------------------------

    def evolution_problems(self) -> list[str]:
        """Every breach of the versioning policy among the schemas held; empty when none."""
        problems: list[str] = []
        for event_type, versions in self.available().items():
            if versions != list(range(1, len(versions) + 1)):
                problems.append(f"{event_type}: versions {versions} are not 1, 2, 3, ...")
            for version in versions:
                for problem in _version_naming(
                    event_type, version, self.schema(event_type, version)
                ):
                    problems.append(f"{event_type} v{version}: {problem}")
            for old, new in itertools.pairwise(versions):
                for change in schema_changes(
                    self.schema(event_type, old), self.schema(event_type, new)
                ):
                    problems.append(f"{event_type} v{old} -> v{new}: {change}")
        return problems
