"""Reading the bridge's topics back, for downstream services: typed, validated, versioned.

`EventReader` reads one or more topics from explicit positions (offsets, a time, the
beginning, the end, or a consumer group's committed offsets) up to an optional end bound,
always `read_committed`. It validates each value against the schema version it names,
upcasts older versions to the version the reader is written for, and yields one frozen
dataclass per event type (`NavTick`, `VwapTick`, `Settlement`, `Gap`, `DeadLetter`):

    async with EventReader(settings, ["vinter.nav.ticks"], start=since, stop_at_end=True) as r:
        async for event in r:
            match event:
                case NavTick(symbol=symbol, timestamp=ts): ...

`RecordReader` is the same positioning without decoding: raw records, what
`kaiko-bridge replay` copies byte for byte. `EventDecoder` is the pure part (bytes in, typed
event or `BadRecord` out) and `SchemaRegistry` holds the schemas, shipped or extra, and the
upcasters.

Ranges are half-open: `start` is the first offset read and `stop` the first one not read (an
offset, or the first record whose timestamp is at or after a time), so reading [a, b) and
then [b, c) sees every record exactly once. Bounds apply per partition.

A value that is not JSON, not a CloudEvent, of an unknown type or version, or that violates
its schema is a `BadRecord`: passed to `on_error(record, error)` when given, else raised from
the iteration, which may then go on after it. Nothing is skipped silently.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import time
from collections import OrderedDict, deque
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Protocol

import jsonschema_rs
import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from bridge import events, validation
from bridge.config import KafkaSettings
from bridge.errors import BadRecord, BridgeError, ConfigError
from bridge.kafka import client_kwargs

__all__ = [
    "DEFAULT_DEDUPE_SIZE",
    "ConsumedEvent",
    "DeadLetter",
    "EventDecoder",
    "EventReader",
    "Gap",
    "KafkaRecord",
    "NavTick",
    "RecentIds",
    "RecordReader",
    "SchemaRegistry",
    "Settlement",
    "VwapTick",
    "schema_changes",
]

DEFAULT_DEDUPE_SIZE = 100_000
DEFAULT_MAX_RECORDS = 10_000
POLL_TIMEOUT_S = 0.5

SCHEMA_ID_RE = re.compile(r"^urn:kaiko-bridge:schema:(?P<type>[^:]+):(?P<version>[1-9][0-9]*)$")

Offsets = int | Mapping[int, int] | Mapping[tuple[str, int], int]
"""One offset for every partition, or per partition number, or per (topic, partition)."""
StartAt = Literal["beginning", "end", "committed"] | Offsets | datetime
StopAt = Offsets | datetime
Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


class KafkaRecord(Protocol):
    """What the readers need of a Kafka record (aiokafka's `ConsumerRecord` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


ErrorHandler = Callable[[KafkaRecord, BadRecord], Awaitable[None] | None]


# -- schemas and their evolution ------------------------------------------------------------

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
        check = self.validator(event_type, version)
        if check.is_valid(instance):
            return None
        for error in check.iter_errors(instance):
            where = "/".join(str(p) for p in error.instance_path) or "(root)"
            return f"{where}: {error.message}"
        return "invalid"

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


# -- typed events -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumedEvent:
    """An event read from Kafka: its CloudEvents envelope, its data and where it was read.

    `data` is the event's data as of `version`, the version the reader is written for (older
    events are upcast to it); `written_version` is the version on the wire. Types without a
    class of their own (an event type added by an extra schema directory) arrive as this.
    """

    specversion: str
    id: str
    source: str
    type: str
    time: str
    subject: str
    datacontenttype: str
    dataschema: str
    data: Mapping[str, Any] = field(hash=False)
    version: int
    written_version: int
    topic: str
    partition: int
    offset: int
    key: str | None
    kafka_timestamp: int
    """The Kafka record's timestamp, Unix milliseconds."""
    headers: tuple[tuple[str, bytes], ...] = field(hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class NavTick(ConsumedEvent):
    """`vinter.nav.tick`: one NAV record of any frequency (`close` or `value` is set)."""

    symbol: str
    frequency: str
    timestamp: int
    """Upstream calculation time, Unix milliseconds."""
    official: bool
    upstream_id: int | None
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    value: float | None
    date: str | None
    hour: int | None

    @property
    def nav(self) -> float:
        """The NAV: `close` for daily and hourly records, `value` for real-time ones."""
        price = self.close if self.close is not None else self.value
        assert price is not None  # noqa: S101 - the schema requires one of them
        return price


@dataclass(frozen=True, slots=True, kw_only=True)
class VwapTick(ConsumedEvent):
    """`kaiko.vwap.tick`: one VWAP interval of one instrument."""

    exchange: str
    instrument_class: str
    code: str
    aggregate: str
    uid: str
    price: float
    ts_event: str
    ts_event_ns: int
    sequence_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Settlement(ConsumedEvent):
    """`vinter.nav.settlement`: an official daily close; a correction is the next revision."""

    symbol: str
    date: str
    revision: int
    supersedes: int | None
    close: float
    open: float | None
    high: float | None
    low: float | None
    upstream_id: int
    timestamp: int
    updated_at: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Gap(ConsumedEvent):
    """`bridge.gap`: intervals between `last_before` and `first_after` may be missing."""

    upstream: str
    instrument: str
    aggregate: str | None
    reason: str
    last_before: str | None
    first_after: str
    detected_at: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter(ConsumedEvent):
    """`bridge.deadletter`: upstream input the bridge refused, with the reason."""

    upstream: str
    reason: str
    detail: str
    raw: str
    raw_encoding: str
    record_key: str | None
    event_type: str | None
    received_at: str

    def raw_bytes(self) -> bytes:
        """The refused input exactly as received."""
        if self.raw_encoding == "base64":
            return base64.b64decode(self.raw)
        return self.raw.encode("utf-8")


def _nav(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return NavTick(
        **common,
        symbol=d["symbol"],
        frequency=d["frequency"],
        timestamp=d["timestamp"],
        official=d["official"],
        upstream_id=d.get("id"),
        open=d.get("open"),
        high=d.get("high"),
        low=d.get("low"),
        close=d.get("close"),
        value=d.get("value"),
        date=d.get("date"),
        hour=d.get("hour"),
    )


def _vwap(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return VwapTick(
        **common,
        exchange=d["exchange"],
        instrument_class=d["instrument_class"],
        code=d["code"],
        aggregate=d["aggregate"],
        uid=d["uid"],
        price=d["price"],
        ts_event=d["ts_event"],
        ts_event_ns=d["ts_event_ns"],
        sequence_id=d["sequence_id"],
    )


def _settlement(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return Settlement(
        **common,
        symbol=d["symbol"],
        date=d["date"],
        revision=d["revision"],
        supersedes=d["supersedes"],
        close=d["close"],
        open=d.get("open"),
        high=d.get("high"),
        low=d.get("low"),
        upstream_id=d["upstream_id"],
        timestamp=d["timestamp"],
        updated_at=d["updated_at"],
    )


def _gap(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return Gap(
        **common,
        upstream=d["source"],
        instrument=d["key"],
        aggregate=d.get("aggregate"),
        reason=d["reason"],
        last_before=d["last_before"],
        first_after=d["first_after"],
        detected_at=d["detected_at"],
    )


def _dead_letter(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return DeadLetter(
        **common,
        upstream=d["source"],
        reason=d["reason"],
        detail=d["detail"],
        raw=d["raw"],
        raw_encoding=d["raw_encoding"],
        record_key=d.get("key"),
        event_type=d.get("event_type"),
        received_at=d["received_at"],
    )


def _generic(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return ConsumedEvent(**common)


Builder = Callable[[dict[str, Any], Mapping[str, Any]], ConsumedEvent]
BUILDERS: dict[str, Builder] = {
    events.NAV_TICK: _nav,
    events.VWAP_TICK: _vwap,
    events.SETTLEMENT: _settlement,
    events.GAP: _gap,
    events.DEAD_LETTER: _dead_letter,
}


# -- decoding (pure) --------------------------------------------------------------------------


def _header(headers: Sequence[tuple[str, bytes]], name: str) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


class EventDecoder:
    """Pure: one Kafka record -> a typed event at the version the reader is written for.

    `versions` names, per event type, the version the reader is written for (default: the
    newest the registry knows). Older events are upcast to it; newer ones the registry
    knows are validated against their own version and delivered as written (the additive
    rule keeps every field an older reader relies on). Raises `BadRecord` and nothing else.
    """

    def __init__(
        self, registry: SchemaRegistry | None = None, *, versions: Mapping[str, int] | None = None
    ) -> None:
        self.registry = registry or SchemaRegistry()
        self._versions = dict(versions or {})
        for event_type, version in self._versions.items():
            if not self.registry.knows(event_type, version):
                raise ConfigError("versions", f"no schema {event_type} v{version}")

    def target(self, event_type: str) -> int:
        """The version events of `event_type` are delivered at (at least)."""
        return self._versions.get(event_type) or self.registry.latest(event_type)

    def decode(self, record: KafkaRecord) -> ConsumedEvent:
        raw = record.value
        if raw is None:
            raise BadRecord("empty_value", "the record has no value (a tombstone?)")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRecord("not_json", str(exc)[:200], raw=raw) from None
        if not isinstance(doc, dict):
            raise BadRecord("not_cloudevent", "the value is not a JSON object", raw=raw)
        event_type, event_id = doc.get("type"), doc.get("id")
        if doc.get("specversion") != events.SPECVERSION or not isinstance(event_type, str):
            raise BadRecord("not_cloudevent", "no CloudEvents 1.0 specversion and type", raw=raw)
        if not isinstance(event_id, str):
            raise BadRecord("not_cloudevent", "no event id", raw=raw)
        if not self.registry.knows(event_type):
            raise BadRecord("unknown_type", f"no schema for event type {event_type!r}", raw=raw)
        version = self._version(event_type, doc, record.headers, raw)
        if not self.registry.knows(event_type, version):
            known = ", ".join(map(str, self.registry.versions(event_type)))
            raise BadRecord(
                "unknown_version",
                f"{event_type} v{version} is not known here (known: {known}); add its schema",
                raw=raw,
            )
        problem = self.registry.first_error(event_type, version, doc)
        if problem is not None:
            raise BadRecord("schema_violation", problem, raw=raw)
        data: dict[str, Any] = doc["data"]
        target = self.target(event_type)
        delivered = version
        if version < target:
            data = self._upcast(event_type, version, target, doc, raw)
            delivered = target
        key = record.key
        common: dict[str, Any] = {
            "specversion": doc["specversion"],
            "id": event_id,
            "source": doc["source"],
            "type": event_type,
            "time": doc["time"],
            "subject": doc["subject"],
            "datacontenttype": doc["datacontenttype"],
            "dataschema": doc["dataschema"],
            "data": MappingProxyType(data),
            "version": delivered,
            "written_version": version,
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "key": key.decode("utf-8", "replace") if key is not None else None,
            "kafka_timestamp": record.timestamp,
            "headers": tuple(record.headers),
        }
        try:
            return BUILDERS.get(event_type, _generic)(common, data)
        except (KeyError, TypeError) as exc:  # a schema looser than its class
            raise BadRecord("undecodable", f"{event_type}: {exc!r}", raw=raw) from None

    def _version(
        self, event_type: str, doc: dict[str, Any], headers: Sequence[tuple[str, bytes]], raw: bytes
    ) -> int:
        """The version the value names: its `dataschema`, checked against the headers."""
        named: int | None = None
        dataschema = doc.get("dataschema")
        match = SCHEMA_ID_RE.match(dataschema) if isinstance(dataschema, str) else None
        if match is not None:
            if match["type"] != event_type:
                raise BadRecord(
                    "type_mismatch", f"dataschema {dataschema} for type {event_type}", raw=raw
                )
            named = int(match["version"])
        header_type = _header(headers, "event-type")
        if header_type is not None and header_type != event_type.encode():
            raise BadRecord(
                "type_mismatch",
                f"header event-type {header_type[:80]!r}, value type {event_type}",
                raw=raw,
            )
        header_version = _header(headers, "schema-version")
        from_header = int(header_version) if header_version and header_version.isdigit() else None
        if named is not None and from_header is not None and named != from_header:
            raise BadRecord(
                "version_mismatch",
                f"dataschema names v{named}, header schema-version v{from_header}",
                raw=raw,
            )
        version = named if named is not None else from_header
        if version is None:
            raise BadRecord("not_cloudevent", "no dataschema and no schema-version header", raw=raw)
        return version

    def _upcast(
        self, event_type: str, version: int, target: int, doc: dict[str, Any], raw: bytes
    ) -> dict[str, Any]:
        try:
            data = self.registry.upcast_to(event_type, version, target, dict(doc["data"]))
        except Exception as exc:  # an upcaster is user code: report, never crash the reader
            raise BadRecord(
                "upcast_failed", f"{event_type} v{version} -> v{target}: {exc!r}", raw=raw
            ) from exc
        upcast_doc = {**doc, "dataschema": validation.schema_id(event_type, target), "data": data}
        problem = self.registry.first_error(event_type, target, upcast_doc)
        if problem is not None:
            raise BadRecord(
                "upcast_failed", f"{event_type} v{version} -> v{target}: {problem}", raw=raw
            )
        return data


class RecentIds:
    """The most recently seen event ids, at most `max_size` of them (least recent forgotten)."""

    def __init__(self, max_size: int = DEFAULT_DEDUPE_SIZE) -> None:
        if max_size < 1:
            raise ConfigError("dedupe", "the de-duplication window must hold at least one id")
        self.max_size = max_size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def seen(self, event_id: str) -> bool:
        """True if `event_id` was seen recently; remembers it either way."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return True
        self._ids[event_id] = None
        if len(self._ids) > self.max_size:
            self._ids.popitem(last=False)
        return False

    def __len__(self) -> int:
        return len(self._ids)


# -- reading records between two positions ----------------------------------------------------


@dataclass(slots=True)
class _Partition:
    tp: Any  # aiokafka TopicPartition
    start: int
    end: int  # the end offset (last stable offset) when the reader started
    bound: int | None  # the first offset not to read, when known
    stop_ms: int | None  # or: stop at the first record at or after this time
    position: int = 0  # the next offset to read
    done: bool = False


def _epoch_ms(moment: datetime, what: str) -> int:
    if moment.tzinfo is None:
        raise ConfigError(what, "a time needs a timezone (e.g. 2024-05-01T00:00:00Z)")
    return int(moment.timestamp() * 1000)


def _offset_for(offsets: Offsets, tp: Any) -> int | None:
    if isinstance(offsets, int):
        return offsets
    for key, offset in offsets.items():
        if key in (tp.partition, (tp.topic, tp.partition)):
            return int(offset)
    return None


class RecordReader:
    """Raw records of some topics between two positions, read_committed, in offset order
    per partition.

    `start`: "beginning", "end", "committed" (the `group_id`'s offsets; `reset` where it has
    none), an offset for every partition, offsets per partition (`{partition: offset}` or
    `{(topic, partition): offset}`, naming every partition read) or an aware `datetime` (the
    first record whose timestamp is at or after it, as `offsets_for_times`). An offset the
    log no longer holds reads from the log start; one beyond its end waits for it.

    `stop` (exclusive, per partition): an offset, offsets per partition (partitions not
    named have no bound) or an aware `datetime` (stop at the first record whose timestamp is
    at or after it; when that time has passed, a partition without such a record ends where
    its log ended at start). With `stop_at_end=True`, a partition also ends at the end offset
    it had when the reader started. Iteration ends when every partition has ended, and runs
    on (waiting for new records) while one has not.

    Partitions are assigned, not balanced by a group: `group_id` only names where
    `commit()` stores offsets and where `start="committed"` reads them.
    """

    def __init__(
        self,
        settings: KafkaSettings | str,
        topics: str | Sequence[str],
        *,
        start: StartAt = "beginning",
        stop: StopAt | None = None,
        stop_at_end: bool = False,
        partitions: Iterable[int] | None = None,
        keys: Iterable[str] | None = None,
        group_id: str | None = None,
        reset: Literal["beginning", "end"] = "beginning",
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self._settings = (
            KafkaSettings(bootstrap_servers=settings) if isinstance(settings, str) else settings
        )
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ConfigError("topics", "name at least one topic")
        if start == "committed" and group_id is None:
            raise ConfigError("group_id", "start='committed' needs a group_id")
        if isinstance(start, datetime):
            _epoch_ms(start, "start")
        if isinstance(stop, datetime):
            _epoch_ms(stop, "stop")
        self._start = start
        self._stop = stop
        self.stop_at_end = stop_at_end
        self._only = None if partitions is None else sorted(set(partitions))
        self._keys = None if keys is None else {k.encode() for k in keys}
        self.group_id = group_id
        self._reset = reset
        self._max_records = max_records
        self._consumer: Any = None
        self._parts: dict[Any, _Partition] = {}
        self._consumed: dict[Any, int] = {}
        self._state: Literal["new", "open", "closed"] = "new"
        self.records_read = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> RecordReader:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, look the partitions up and seek each one to its start."""
        if self._state != "new":
            raise RuntimeError("a reader starts once; make a new one to read again")
        self._state = "open"
        self._consumer = AIOKafkaConsumer(
            **client_kwargs(self._settings),
            group_id=self.group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            request_timeout_ms=self._settings.request_timeout_ms,
        )
        try:
            await self._consumer.start()
            await self._position()
        except BaseException as exc:
            await self.close()
            if isinstance(exc, KafkaError):
                raise BridgeError(
                    f"cannot read {', '.join(self.topics)} from"
                    f" {self._settings.bootstrap_servers}: {exc}"
                ) from exc
            raise

    async def close(self) -> None:
        """Leave Kafka. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._consumer is not None:
            await self._consumer.stop()

    async def _partitions(self) -> list[Any]:
        consumer = self._consumer
        existing = await consumer.topics()
        missing = [t for t in self.topics if t not in existing]
        if missing:
            raise ConfigError("topics", f"no such topic: {', '.join(missing)}")
        tps: list[Any] = []
        for topic in self.topics:
            # aiokafka has no public call that loads one topic's metadata on demand.
            numbers = sorted(await consumer._client._wait_on_metadata(topic))
            if self._only is not None:
                absent = sorted(set(self._only) - set(numbers))
                if absent:
                    raise ConfigError("partitions", f"{topic} has no partition {absent}")
                numbers = [p for p in numbers if p in self._only]
            tps.extend(TopicPartition(topic, p) for p in numbers)
        return tps

    async def _position(self) -> None:
        consumer = self._consumer
        tps = await self._partitions()
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        starts = await self._starts(tps, begins, ends)
        stops: dict[Any, int] = {}
        stop_ms: int | None = None
        if isinstance(self._stop, datetime):
            stop_ms = _epoch_ms(self._stop, "stop")
            found = await consumer.offsets_for_times(dict.fromkeys(tps, stop_ms))
            stops = {tp: int(hit.offset) for tp, hit in found.items() if hit is not None}
            if stop_ms <= time.time() * 1000:
                # A time already past: a partition with no record at or after it ends where
                # its log ends now (records written from now on carry later times).
                stops = {tp: stops.get(tp, int(ends[tp])) for tp in tps}
        elif self._stop is not None:
            for tp in tps:
                offset = _offset_for(self._stop, tp)
                if offset is not None:
                    stops[tp] = offset
        for tp in tps:
            end = int(ends[tp])
            start = max(starts[tp], int(begins[tp]))  # before the log start: from its start
            limits = (stops.get(tp), end if self.stop_at_end else None)
            bound = min((b for b in limits if b is not None), default=None)
            part = _Partition(tp, start, end, bound, stop_ms, position=start)
            self._parts[tp] = part
            # A start beyond the log end waits at the end (seeking past it would reset the
            # position) and skips records up to the start when they come.
            consumer.seek(tp, min(start, end))
            if bound is not None and start >= bound:
                self._finish(part, start)

    async def _starts(self, tps: list[Any], begins: Any, ends: Any) -> dict[Any, int]:
        consumer, start = self._consumer, self._start
        if start == "beginning":
            return {tp: int(begins[tp]) for tp in tps}
        if start == "end":
            return {tp: int(ends[tp]) for tp in tps}
        if start == "committed":
            fallback = begins if self._reset == "beginning" else ends
            starts = {}
            for tp in tps:
                committed = await consumer.committed(tp)
                starts[tp] = int(committed if committed is not None else fallback[tp])
            return starts
        if isinstance(start, datetime):
            found = await consumer.offsets_for_times(dict.fromkeys(tps, _epoch_ms(start, "start")))
            return {tp: int(ends[tp] if found.get(tp) is None else found[tp].offset) for tp in tps}
        if isinstance(start, str):
            raise ConfigError("start", f"unknown start {start!r}")
        starts = {}
        for tp in tps:
            offset = _offset_for(start, tp)
            if offset is None:
                raise ConfigError(
                    "start", f"no start offset for {tp.topic} partition {tp.partition}"
                )
            if offset < 0:
                raise ConfigError("start", f"offset {offset} is negative")
            starts[tp] = offset
        return starts

    def _finish(self, part: _Partition, at: int) -> None:
        part.done = True
        part.position = part.bound = at
        self._consumer.pause(part.tp)

    # -- reading ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return all(part.done for part in self._parts.values())

    def progress(self) -> tuple[int, int | None]:
        """(offsets read, offsets to read in all); the total is None while one is unbounded."""
        parts = self._parts.values()
        read = sum(part.position - part.start for part in parts)
        if any(part.bound is None for part in parts):
            return read, None
        return read, sum(max(0, (part.bound or 0) - part.start) for part in parts)

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Per (topic, partition): where reading ends (or ended); absent while unbounded."""
        return {
            (part.tp.topic, part.tp.partition): part.bound
            for part in self._parts.values()
            if part.bound is not None
        }

    async def batches(self, *, mark: bool = True) -> AsyncGenerator[list[KafkaRecord], None]:
        """Lists of records, in offset order per partition, until every partition ended.

        With `mark=True`, each list counts as handled (for `commit()`) once yielded.
        """
        if self._state != "open":
            raise RuntimeError("start the reader first (async with, or await start())")
        consumer = self._consumer
        while not self.finished:
            active = [p.tp for p in self._parts.values() if not p.done]
            fetched = await consumer.getmany(
                *active, timeout_ms=int(POLL_TIMEOUT_S * 1000), max_records=self._max_records
            )
            out: list[KafkaRecord] = []
            for tp, records in fetched.items():
                part = self._parts[tp]
                if part.done:
                    continue
                for record in records:
                    if record.offset < part.start:
                        continue
                    if self._beyond(part, record):
                        self._finish(part, record.offset)
                        break
                    part.position = record.offset + 1
                    if self._keys is None or record.key in self._keys:
                        out.append(record)
                if mark and records:
                    self._consumed[tp] = part.position
            await self._check_ends()
            if out:
                self.records_read += len(out)
                yield out

    def __aiter__(self) -> AsyncIterator[KafkaRecord]:
        return self._records()

    async def _records(self) -> AsyncIterator[KafkaRecord]:
        async for batch in self.batches(mark=False):
            for record in batch:
                self._mark(record)
                yield record

    @staticmethod
    def _beyond(part: _Partition, record: KafkaRecord) -> bool:
        if part.bound is not None and record.offset >= part.bound:
            return True
        return part.stop_ms is not None and record.timestamp >= part.stop_ms

    async def _check_ends(self) -> None:
        """End partitions whose position reached their bound.

        The position, not the last record's offset: with read_committed, transaction markers
        and aborted records take offsets no record is delivered for.
        """
        for part in self._parts.values():
            if part.done or part.bound is None:
                continue
            part.position = max(part.position, int(await self._consumer.position(part.tp)))
            if part.position >= part.bound:
                self._finish(part, part.bound)

    def _mark(self, record: KafkaRecord) -> None:
        self._consumed[TopicPartition(record.topic, record.partition)] = record.offset + 1

    async def commit(self) -> None:
        """Store, under `group_id`, the position after the last record handled per partition."""
        if self.group_id is None:
            raise ConfigError("group_id", "commit() needs a group_id")
        if self._consumed:
            try:
                await self._consumer.commit(dict(self._consumed))
            except KafkaError as exc:
                raise BridgeError(f"cannot commit offsets for {self.group_id}: {exc}") from exc


# -- typed reading ----------------------------------------------------------------------------


class EventReader:
    """Typed, validated events of some topics between two positions (see `RecordReader` for
    `start`, `stop`, `stop_at_end`, `partitions`, `keys`, `group_id` and `reset`).

    `versions` names the version the reader is written for per event type (default: the
    newest known); `registry` or `schema_dirs` add schemas (e.g. a version newer than this
    package) and upcasters. `dedupe=True` (or a window size) drops events whose id was seen
    recently. A bad record goes to `on_error(record, error)` (sync or async) when given,
    else `BadRecord` is raised from the iteration; iterating again goes on after it.
    """

    def __init__(
        self,
        settings: KafkaSettings | str,
        topics: str | Sequence[str],
        *,
        start: StartAt = "beginning",
        stop: StopAt | None = None,
        stop_at_end: bool = False,
        partitions: Iterable[int] | None = None,
        keys: Iterable[str] | None = None,
        group_id: str | None = None,
        reset: Literal["beginning", "end"] = "beginning",
        registry: SchemaRegistry | None = None,
        schema_dirs: Iterable[str | Path] = (),
        versions: Mapping[str, int] | None = None,
        dedupe: bool | int = False,
        on_error: ErrorHandler | None = None,
    ) -> None:
        dirs = list(schema_dirs)
        if registry is not None and dirs:
            raise ConfigError("schema_dirs", "give a registry or schema_dirs, not both")
        self.decoder = EventDecoder(registry or SchemaRegistry(dirs), versions=versions)
        self.records = RecordReader(
            settings,
            topics,
            start=start,
            stop=stop,
            stop_at_end=stop_at_end,
            partitions=partitions,
            keys=keys,
            group_id=group_id,
            reset=reset,
        )
        size = DEFAULT_DEDUPE_SIZE if dedupe is True else int(dedupe)
        self._recent = RecentIds(size) if dedupe else None
        self._on_error = on_error
        self._buffer: deque[KafkaRecord] = deque()
        self._batches: AsyncGenerator[list[KafkaRecord], None] | None = None
        self.delivered = 0
        self.duplicates = 0
        self.bad_records = 0

    @property
    def registry(self) -> SchemaRegistry:
        return self.decoder.registry

    async def __aenter__(self) -> EventReader:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.records.start()
        self._batches = self.records.batches(mark=False)

    async def close(self) -> None:
        """Leave Kafka. Idempotent."""
        batches, self._batches = self._batches, None
        if batches is not None:
            await batches.aclose()
        await self.records.close()

    async def commit(self) -> None:
        """Store the position after the last event delivered (or bad record surfaced)."""
        await self.records.commit()

    def progress(self) -> tuple[int, int | None]:
        return self.records.progress()

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> ConsumedEvent:
        if self._batches is None:
            raise RuntimeError("start the reader first (async with, or await start())")
        while True:
            while self._buffer:
                record = self._buffer.popleft()
                self.records._mark(record)
                try:
                    event = self.decoder.decode(record)
                except BadRecord as exc:
                    self.bad_records += 1
                    if self._on_error is None:
                        exc.add_note(f"at {record.topic} partition {record.partition}"
                                     f" offset {record.offset}")  # fmt: skip
                        raise
                    handled = self._on_error(record, exc)
                    if handled is not None:
                        await handled
                    continue
                if self._recent is not None and self._recent.seen(event.id):
                    self.duplicates += 1
                    continue
                self.delivered += 1
                return event
            batch = await anext(self._batches, None)
            if batch is None:
                raise StopAsyncIteration
            self._buffer.extend(batch)
