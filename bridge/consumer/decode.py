"""Bytes in, typed event or `BadRecord` out: `EventDecoder` checks a record's envelope,
version and schema and upcasts it; `RecentIds` remembers recent ids for de-duplication. Pure:
no I/O.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import orjson

from bridge import events, validation
from bridge.consumer.records import KafkaRecord
from bridge.consumer.schemas import SchemaRegistry
from bridge.consumer.typed import BUILDERS, ConsumedEvent, _generic
from bridge.errors import BadRecord, ConfigError

DEFAULT_DEDUPE_SIZE = 100_000

SCHEMA_ID_RE = re.compile(r"^urn:kaiko-bridge:schema:(?P<type>[^:]+):(?P<version>[1-9][0-9]*)$")


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
