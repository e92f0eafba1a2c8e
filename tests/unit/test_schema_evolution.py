"""Schema evolution: every shipped version is additive, the checker itself, and the pure
decoder's version dispatch (upcasting older events, reading newer ones)."""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge import events, validation
from bridge.consumer import (
    ConsumedEvent,
    DeadLetter,
    EventDecoder,
    NavTick,
    RecentIds,
    SchemaRegistry,
    schema_changes,
)
from bridge.errors import BadRecord, ConfigError
from tests.samples import nav_event

NAV = events.NAV_TICK
T0 = 1_700_000_000_000


#: The newest shipped version of `vinter.nav.tick`, and a hypothetical one after it.
LATEST = validation.latest_version(NAV)
NEXT = LATEST + 1


def nav_schema(version: int = LATEST) -> dict[str, Any]:
    return copy.deepcopy(validation.load_schema(NAV, version))


def successor(schema: dict[str, Any], version: int) -> dict[str, Any]:
    """`schema` renamed to `version` ($id and the dataschema constant), otherwise unchanged."""
    new = copy.deepcopy(schema)
    new["$id"] = validation.schema_id(NAV, version)
    new["properties"]["dataschema"] = {"const": validation.schema_id(NAV, version)}
    return new


def nav_next() -> dict[str, Any]:
    """The latest plus one optional field in `data`: the additive change the policy allows."""
    new = successor(nav_schema(), NEXT)
    new["properties"]["data"]["properties"]["venue"] = {"type": ["string", "null"]}
    return new


def write_schema(root: Path, event_type: str, version: int, schema: dict[str, Any]) -> Path:
    path = root / event_type / f"{version}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(schema, indent=2), encoding="utf-8")
    return root


@dataclass(frozen=True)
class Record:
    """A Kafka record as the decoder sees one."""

    value: bytes | None
    headers: tuple[tuple[str, bytes], ...] = ()
    topic: str = "t"
    partition: int = 0
    offset: int = 0
    timestamp: int = T0
    key: bytes | None = b"vnfa-btca-15-r"


def nav_record(version: int = 1, *, venue: str | None = None, ts: int = T0) -> Record:
    doc = nav_event("vnfa-btca-15-r", ts, 101.5).envelope()
    doc["dataschema"] = validation.schema_id(NAV, version)
    if version == 1:  # revisions came with version 2
        del doc["data"]["revision"], doc["data"]["supersedes"]
    if venue is not None:
        doc["data"]["venue"] = venue
    return Record(orjson.dumps(doc), tuple(events.kafka_headers(NAV, version)))


# -- the shipped schemas ----------------------------------------------------------------------


def test_every_shipped_version_is_additive_over_the_one_before() -> None:
    shipped = validation.available()
    assert shipped, "no schemas shipped"
    for event_type, versions in shipped.items():
        assert versions == list(range(1, len(versions) + 1)), event_type
        for old, new in itertools.pairwise(versions):
            changes = schema_changes(
                validation.load_schema(event_type, old), validation.load_schema(event_type, new)
            )
            assert changes == [], f"{event_type} v{old} -> v{new}: {changes}"
    assert SchemaRegistry().evolution_problems() == []


def test_the_registry_holds_what_the_package_ships() -> None:
    assert SchemaRegistry().available() == validation.available()


# -- the checker ------------------------------------------------------------------------------


def test_an_optional_field_is_additive(tmp_path: Path) -> None:
    assert schema_changes(nav_schema(), nav_next()) == []
    registry = SchemaRegistry([write_schema(tmp_path, NAV, NEXT, nav_next())])
    assert registry.versions(NAV) == list(range(1, NEXT + 1))
    assert registry.latest(NAV) == NEXT


def test_annotations_do_not_count() -> None:
    new = nav_next()
    new["title"] = "something else"
    new["properties"]["data"]["properties"]["timestamp"]["description"] = "reworded"
    assert schema_changes(nav_schema(), new) == []


def _remove_field(s: dict[str, Any]) -> None:
    del s["properties"]["data"]["properties"]["hour"]


def _retype_field(s: dict[str, Any]) -> None:
    s["properties"]["data"]["properties"]["timestamp"] = {"type": "string"}


def _require_new_field(s: dict[str, Any]) -> None:
    s["properties"]["data"]["required"].append("venue")


def _drop_required(s: dict[str, Any]) -> None:
    s["properties"]["data"]["required"].remove("official")


def _close_open_object(s: dict[str, Any]) -> None:
    s["properties"]["data"]["properties"]["extra"]["additionalProperties"] = False


def _add_to_open_object(s: dict[str, Any]) -> None:
    s["properties"]["data"]["properties"]["extra"]["properties"] = {"x": {"type": "integer"}}


def _narrow_enum(s: dict[str, Any]) -> None:
    s["properties"]["data"]["properties"]["frequency"]["enum"] = ["daily", "hourly"]


def _tighten_bound(s: dict[str, Any]) -> None:
    s["properties"]["data"]["properties"]["symbol"]["minLength"] = 5


def _change_any_of(s: dict[str, Any]) -> None:
    s["properties"]["data"]["anyOf"] = [{"required": ["close"]}]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_remove_field, "data.hour: removed"),
        (_retype_field, "data.timestamp: type changed from 'integer' to 'string'"),
        (_require_new_field, "data: newly required ['venue']"),
        (_drop_required, "data: no longer required ['official']"),
        (_close_open_object, "data.extra: additionalProperties tightened"),
        (_add_to_open_object, "data.extra: new properties ['x'] in an object that allowed"),
        (_narrow_enum, "data.frequency: changed (enum)"),
        (_tighten_bound, "data.symbol: changed (minLength)"),
        (_change_any_of, "data: anyOf changed"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_incompatible_changes_are_named(
    tmp_path: Path, mutate: Callable[[dict[str, Any]], None], expected: str
) -> None:
    new = nav_next()
    mutate(new)
    changes = schema_changes(nav_schema(), new)
    assert any(change.startswith(expected) for change in changes), changes
    with pytest.raises(ConfigError, match=f"v{LATEST} -> v{NEXT}"):
        SchemaRegistry([write_schema(tmp_path, NAV, NEXT, new)])
    # check=False loads it anyway (to inspect a candidate schema, say)
    assert SchemaRegistry([tmp_path], check=False).evolution_problems()


def test_a_version_must_name_itself(tmp_path: Path) -> None:
    new = nav_next()
    new["properties"]["dataschema"] = {"const": validation.schema_id(NAV, LATEST)}
    with pytest.raises(ConfigError, match="dataschema must be"):
        SchemaRegistry([write_schema(tmp_path, NAV, NEXT, new)])


def test_versions_have_no_holes(tmp_path: Path) -> None:
    write_schema(tmp_path, NAV, NEXT + 1, successor(nav_next(), NEXT + 1))
    listed = ", ".join(map(str, [*range(1, NEXT), NEXT + 1]))
    with pytest.raises(ConfigError, match=rf"versions \[{listed}\]"):
        SchemaRegistry([tmp_path])


def test_a_shipped_version_cannot_be_redefined(tmp_path: Path) -> None:
    changed = nav_schema(1)
    changed["properties"]["data"]["properties"]["venue"] = {"type": "string"}
    with pytest.raises(ConfigError, match=r"redefines vinter\.nav\.tick v1"):
        SchemaRegistry([write_schema(tmp_path, NAV, 1, changed)])
    # the same content again is harmless
    SchemaRegistry([write_schema(tmp_path, NAV, 1, nav_schema(1))])


# -- version dispatch (pure decoding) ---------------------------------------------------------


@pytest.fixture
def registry_next(tmp_path: Path) -> SchemaRegistry:
    return SchemaRegistry([write_schema(tmp_path, NAV, NEXT, nav_next())])


def test_a_newer_reader_upcasts_older_events(registry_next: SchemaRegistry) -> None:
    decoder = EventDecoder(registry_next)
    old = decoder.decode(nav_record(1))
    new = decoder.decode(nav_record(NEXT, venue="x"))
    assert isinstance(old, NavTick)
    assert isinstance(new, NavTick)
    assert (old.version, old.written_version) == (NEXT, 1)
    assert (new.version, new.written_version) == (NEXT, NEXT)
    assert (old.revision, old.supersedes) == (1, None)
    assert old.symbol == new.symbol == "vnfa-btca-15-r"
    assert old.nav == 101.5
    assert "venue" not in old.data
    assert new.data["venue"] == "x"


def test_an_upcaster_runs_and_its_result_is_validated(registry_next: SchemaRegistry) -> None:
    @registry_next.upcaster(NAV, LATEST)
    def add_venue(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "venue": "unknown"}

    event = EventDecoder(registry_next).decode(nav_record(1))
    assert event.data["venue"] == "unknown"

    registry_next.register_upcast(NAV, LATEST, lambda data: {**data, "venue": 3})
    with pytest.raises(BadRecord) as caught:
        EventDecoder(registry_next).decode(nav_record(1))
    assert caught.value.reason == "upcast_failed"
    assert "venue" in caught.value.detail


def test_an_older_reader_reads_newer_known_versions_as_written(
    registry_next: SchemaRegistry,
) -> None:
    decoder = EventDecoder(registry_next, versions={NAV: 1})
    assert decoder.decode(nav_record(1)).version == 1
    newer = decoder.decode(nav_record(NEXT, venue="x"))
    assert (newer.version, newer.written_version) == (NEXT, NEXT)
    revised = decoder.decode(nav_record(LATEST))
    assert (revised.version, revised.written_version) == (LATEST, LATEST)
    assert isinstance(revised, NavTick)
    assert revised.nav == 101.5  # what a version 1 reader relies on is still there


def test_an_unknown_version_is_a_bad_record() -> None:
    with pytest.raises(BadRecord) as caught:
        EventDecoder().decode(nav_record(NEXT, venue="x"))
    assert caught.value.reason == "unknown_version"
    assert caught.value.raw == nav_record(NEXT, venue="x").value


def _doc(**changes: Any) -> bytes:
    doc = nav_event("vnfa-btca-15-r", T0).envelope()
    doc.update(changes)
    return orjson.dumps(doc)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (Record(b"{not json"), "not_json"),
        (Record(b"[1, 2]"), "not_cloudevent"),
        (Record(orjson.dumps({"hello": "world"})), "not_cloudevent"),
        (Record(None), "empty_value"),
        (Record(_doc(type="some.other.type", dataschema="urn:x")), "unknown_type"),
        (Record(_doc(data={"symbol": "x"})), "schema_violation"),
        (Record(_doc(), (("schema-version", b"1"),)), "version_mismatch"),
        (Record(_doc(), (("event-type", b"kaiko.vwap.tick"),)), "type_mismatch"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_records_name_their_reason(record: Record, reason: str) -> None:
    with pytest.raises(BadRecord) as caught:
        EventDecoder().decode(record)
    assert caught.value.reason == reason


def test_every_type_decodes_into_its_class() -> None:
    letter = events.dead_letter(source="/vinter/nav/ws", raw=b"\xff{", reason="bad_json")
    record = Record(letter.to_json(), tuple(letter.headers()), key=letter.key.encode())
    event = EventDecoder().decode(record)
    assert isinstance(event, DeadLetter)
    assert event.raw_bytes() == b"\xff{"
    assert event.reason == "bad_json"
    assert isinstance(event, ConsumedEvent)
    assert event.key == event.subject == "/vinter/nav/ws"


@given(
    ts=st.integers(min_value=700_000_000_000, max_value=7_000_000_000_000),
    value=st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
)
def test_any_nav_event_round_trips(ts: int, value: float) -> None:
    event = nav_event("vnfa-etha-10-r", ts, value)
    decoded = EventDecoder(_REGISTRY).decode(
        Record(event.to_json(), tuple(event.headers()), offset=7, key=event.key.encode())
    )
    assert isinstance(decoded, NavTick)
    assert (decoded.id, decoded.timestamp, decoded.nav) == (event.id, ts, value)
    assert (decoded.offset, decoded.key, decoded.version) == (7, "vnfa-etha-10-r", LATEST)


_REGISTRY = SchemaRegistry()


def test_recent_ids_forget_the_least_recently_seen() -> None:
    recent = RecentIds(max_size=2)
    assert not recent.seen("a")
    assert not recent.seen("b")
    assert recent.seen("a")  # a is now the most recent
    assert not recent.seen("c")  # evicts b
    assert len(recent) == 2
    assert recent.seen("a")
    assert not recent.seen("b")
