"""The envelope, ids, headers and schemas: pure code, bytes in, events out."""

from __future__ import annotations

import base64
import dataclasses

import orjson
import pytest

from bridge import events, validation
from bridge.normalize.nav import SOURCE_WS, nav_tick
from tests.samples import DAILY, HOURLY, REALTIME

CLOUDEVENT_KEYS = {
    "specversion",
    "id",
    "source",
    "type",
    "time",
    "subject",
    "datacontenttype",
    "dataschema",
    "data",
}


@pytest.mark.parametrize("record", [DAILY, HOURLY, REALTIME], ids=["daily", "hourly", "rt"])
def test_nav_event_is_a_valid_cloudevent(record: dict[str, object]) -> None:
    event = nav_tick(record, source=SOURCE_WS)
    doc = orjson.loads(event.to_json())
    assert set(doc) == CLOUDEVENT_KEYS
    assert doc["specversion"] == "1.0"
    assert doc["type"] == "vinter.nav.tick"
    assert doc["subject"] == record["symbol"] == event.key
    assert doc["dataschema"] == "urn:kaiko-bridge:schema:vinter.nav.tick:2"
    assert doc["datacontenttype"] == "application/json"
    assert validation.first_error("vinter.nav.tick", 2, doc) is None
    assert (doc["data"]["revision"], doc["data"]["supersedes"]) == (1, None)


def test_same_record_same_id_and_time_from_timestamp() -> None:
    a = nav_tick(dict(DAILY), source=SOURCE_WS)
    b = nav_tick(dict(DAILY), source="/vinter/nav/rest")
    assert a.id == b.id == "nav:vnfa-btca-15-d:1677542400000:1"
    assert a.time == "2023-02-28T00:00:00.000Z"
    other = nav_tick({**DAILY, "timestamp": DAILY["timestamp"] + 1}, source=SOURCE_WS)
    assert other.id != a.id


def test_headers_carry_type_and_version() -> None:
    headers = dict(nav_tick(DAILY, source=SOURCE_WS).headers())
    assert headers == {
        "content-type": b"application/cloudevents+json",
        "event-type": b"vinter.nav.tick",
        "schema-version": b"2",
    }


def test_schema_violation_is_reported_with_its_path() -> None:
    event = nav_tick(DAILY, source=SOURCE_WS)
    broken = dataclasses.replace(event, data={**event.data, "timestamp": "yesterday"})
    problem = broken.validation_error()
    assert problem is not None
    assert "timestamp" in problem


def test_only_the_normalizers_vouch_for_an_event() -> None:
    """The publisher skips validating a `verified` event: a hand-built event or an altered
    copy of a verified one must not carry the mark."""
    event = nav_tick(DAILY, source=SOURCE_WS)
    assert event.verified
    assert not dataclasses.replace(event, data={**event.data, "timestamp": "yesterday"}).verified
    assert not events.Event("t", "i", "s", "2023-02-28T00:00:00.000Z", "k", {}).verified
    assert not events.dead_letter(source="s", raw=b"x", reason="bad_json").verified


def test_dead_letter_keeps_raw_bytes_and_reason() -> None:
    dl = events.dead_letter(source="/vinter/nav/ws", raw=b"{not json", reason="bad_json")
    assert dl.data["raw"] == "{not json"
    assert dl.data["raw_encoding"] == "utf-8"
    assert dl.validation_error() is None
    binary = events.dead_letter(source="s", raw=b"\xff\xfe", reason="bad_json")
    assert binary.data["raw_encoding"] == "base64"
    assert binary.data["raw"] == "//4="
    again = events.dead_letter(source="/vinter/nav/ws", raw=b"{not json", reason="bad_json")
    assert again.id == dl.id


@pytest.mark.parametrize(
    ("raw", "encoding"),
    [
        (bytes(range(256)) * 4096, "base64"),  # 1 MiB that is not UTF-8
        ("\u20ac" * 300_000, "utf-8"),  # 900 kB of 3-byte characters
        ("\x01" * 200_000, "utf-8"),  # 6 bytes each as JSON escapes
    ],
    ids=["binary", "multibyte", "control"],
)
def test_an_over_long_bad_input_keeps_its_start_and_fits_a_kafka_record(
    raw: bytes | str, encoding: str
) -> None:
    """A broker refuses records over 1 MB for good: the dead letter must stay under it."""
    dl = events.dead_letter(source="s", raw=raw, reason="bad_json", detail="why")
    whole = raw if isinstance(raw, bytes) else raw.encode()
    assert len(dl.to_json()) < 1_000_000
    assert dl.data["raw_encoding"] == encoding
    kept = (
        base64.b64decode(dl.data["raw"])
        if encoding == "base64"
        else dl.data["raw"].encode()  # cut on a character: it still decodes
    )
    assert whole.startswith(kept)
    assert 0 < len(kept) < len(whole)
    assert dl.data["detail"] == f"why (first {len(kept)} of {len(whole)} bytes kept)"
    assert dl.validation_error() is None
    # the id hashes the whole input: another input with the same start is another letter
    other = events.dead_letter(source="s", raw=raw[:-1], reason="bad_json")
    assert other.id != dl.id
    assert other.id == events.dead_letter(source="s", raw=raw[:-1], reason="other").id


def test_every_shipped_schema_is_valid_2020_12() -> None:
    import jsonschema_rs

    shipped = validation.available()
    assert set(shipped) == {
        "vinter.nav.tick",
        "kaiko.vwap.tick",
        "vinter.nav.settlement",
        "bridge.gap",
        "bridge.deadletter",
    }
    for event_type, versions in shipped.items():
        for version in versions:
            schema = validation.load_schema(event_type, version)
            assert schema["$id"] == validation.schema_id(event_type, version)
            assert jsonschema_rs.meta.is_valid(schema)


def test_serialized_events_hold_no_slack() -> None:
    """Events wait for Kafka by the thousand: each must cost its JSON, not orjson's buffer."""
    import tracemalloc

    event = nav_tick(REALTIME, source=SOURCE_WS)
    size = len(event.to_json())
    tracemalloc.start()
    try:
        kept = [event.to_json() for _ in range(1000)]
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert orjson.loads(kept[-1]) == event.envelope()
    assert held < 1000 * (size + 256), f"{held / 1000:.0f} bytes held per {size}-byte event"
