"""VWAP normalization: every field kept at full precision; bad input raises BadRecord only."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kaikosdk.stream.aggregates_vwap_v1 import response_pb2

from bridge import validation
from bridge.errors import BadRecord
from bridge.events import GAP, VWAP_TICK
from bridge.normalize.vwap import (
    MAX_NAME_CHARS,
    MAX_NS,
    MIN_NS,
    SOURCE,
    format_uid,
    gap_event,
    interval_mark,
    mark_of,
    parse_rfc3339_ns,
    tick_and_mark,
    vwap_tick,
)
from bridge.timefmt import iso_from_ns
from tests.malformed import DOC_VWAP

# The response example of the vendor docs.
DOC_SAMPLE: dict[str, Any] = DOC_VWAP
DOC_TS_EVENT = "2024-08-09T13:47:20.689338450Z"


def response(ts_event: str | None = DOC_TS_EVENT, **fields: Any) -> Any:
    msg = response_pb2.StreamAggregatesVWAPResponseV1(**{**DOC_SAMPLE, **fields})
    if ts_event is not None:
        msg.ts_event.FromJsonString(ts_event)
    return msg


def ns(text: str) -> int:
    """Reference conversion through datetime (microseconds) plus the nanosecond digits."""
    head, _, frac = text.rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(head).replace(tzinfo=UTC).timestamp())
    return seconds * 1_000_000_000 + int((frac or "0").ljust(9, "0"))


def test_every_field_is_mapped() -> None:
    event = vwap_tick(response())
    assert event.type == VWAP_TICK
    assert event.source == SOURCE == "/kaiko/vwap"
    assert event.key == "binc:spot:eth-usdt"
    assert event.time == DOC_TS_EVENT
    assert event.data == {
        "exchange": "binc",
        "instrument_class": "spot",
        "code": "eth-usdt",
        "aggregate": "1s",
        "uid": "2024-08-09T13:47:19Z",
        "price": 2591.3221372276307,
        "ts_event": DOC_TS_EVENT,
        "ts_event_ns": 1_723_211_240_689_338_450,
        "sequence_id": "",
    }
    assert event.validation_error() is None


@pytest.mark.parametrize(
    ("seconds", "nanos", "text"),
    [
        (1_723_211_240, 1, "2024-08-09T13:47:20.000000001Z"),
        (1_723_211_240, 999_999_999, "2024-08-09T13:47:20.999999999Z"),
        (1_723_211_240, 0, "2024-08-09T13:47:20.000000000Z"),
        (0, 0, "1970-01-01T00:00:00.000000000Z"),
        (-1, 500, "1969-12-31T23:59:59.000000500Z"),
        (MIN_NS // 10**9 + 1, 0, "1677-09-21T00:12:44.000000000Z"),
        (MAX_NS // 10**9, MAX_NS % 10**9, "2262-04-11T23:47:16.854775807Z"),
    ],
)
def test_ts_event_keeps_nanoseconds(seconds: int, nanos: int, text: str) -> None:
    msg = response(ts_event=None)
    msg.ts_event.seconds = seconds
    msg.ts_event.nanos = nanos
    event = vwap_tick(msg)
    assert event.data["ts_event"] == event.time == text
    assert event.data["ts_event_ns"] == seconds * 1_000_000_000 + nanos
    # and it survives JSON: the integer is exact, not a float
    assert orjson.loads(event.to_json())["data"]["ts_event_ns"] == seconds * 1_000_000_000 + nanos


def test_price_is_kept_exactly() -> None:
    price = 0.1 + 0.2
    doc = orjson.loads(vwap_tick(response(price=price)).to_json())
    assert doc["data"]["price"] == price


def test_id_is_deterministic_per_interval() -> None:
    a = vwap_tick(response())
    assert a.id == "vwap:binc:spot:eth-usdt:1s:2024-08-09T13:47:19Z"
    assert vwap_tick(response()).id == a.id
    # the same interval re-sent (even with a revised price) is the same event
    assert vwap_tick(response(price=1.0, ts_event="2024-08-09T13:47:21Z")).id == a.id
    others = [
        response(uid="2024-08-09T13:47:20Z"),
        response(aggregate="1m"),
        response(code="btc-usdt"),
        response(exchange="cbse"),
        response(**{"class": "perpetual-future"}),
    ]
    assert len({a.id, *(vwap_tick(m).id for m in others)}) == 1 + len(others)


def test_mark_round_trips_through_the_published_event() -> None:
    msg = response()
    event, key, mark = tick_and_mark(msg)
    assert (key, mark) == interval_mark(msg) == ("binc:spot:eth-usdt|1s", ns("2024-08-09T13:47:19"))
    assert mark_of(orjson.loads(event.to_json())) == (key, mark)


def test_mark_of_ignores_what_is_not_a_vwap_tick() -> None:
    doc = orjson.loads(vwap_tick(response()).to_json())
    gap = gap_event("binc:spot:eth-usdt", "1s", None, "2024-08-09T13:47:19Z", "reconnect")
    assert mark_of(orjson.loads(gap.to_json())) is None
    assert mark_of({}) is None
    assert mark_of({**doc, "type": "vinter.nav.tick"}) is None
    assert mark_of({**doc, "data": None}) is None
    assert mark_of({**doc, "subject": None}) is None
    assert mark_of({**doc, "data": {**doc["data"], "uid": "yesterday"}}) is None
    assert mark_of({**doc, "data": {**doc["data"], "aggregate": 1}}) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-08-09T13:47:19Z", "2024-08-09T13:47:19"),
        ("2024-08-09t13:47:19z", "2024-08-09T13:47:19"),
        ("2024-08-09T13:47:19.5Z", "2024-08-09T13:47:19.5"),
        ("2024-08-09T13:47:19.123456789Z", "2024-08-09T13:47:19.123456789"),
        ("2024-08-09T13:47:19.1234567891234Z", "2024-08-09T13:47:19.123456789"),
        ("2024-08-09T15:47:19+02:00", "2024-08-09T13:47:19"),
        ("2024-08-09T08:17:19.25-05:30", "2024-08-09T13:47:19.25"),
        ("2024-02-29T00:00:00Z", "2024-02-29T00:00:00"),
        ("2000-02-29T23:59:59Z", "2000-02-29T23:59:59"),
        ("1969-12-31T23:59:59Z", "1969-12-31T23:59:59"),
    ],
)
def test_uid_parsing(text: str, expected: str) -> None:
    assert parse_rfc3339_ns(text) == ns(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "2024-08-09",
        "2024-08-09 13:47:19Z",
        "2024-08-09T13:47:19",  # no offset: not RFC 3339
        "2024-08-09T13:47Z",
        "20240809T134719Z",
        "2023-02-29T00:00:00Z",
        "1900-02-29T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-04-31T00:00:00Z",
        "2024-08-09T24:00:00Z",
        "2024-08-09T13:60:00Z",
        "2024-08-09T13:47:60Z",
        "2024-08-09T13:47:19.Z",
        "2024-08-09T13:47:19+24:00",
        "2024-08-09T13:47:19Z ",
        "٢٠٢٤-08-09T13:47:19Z",  # non-ASCII digits
        "1677-09-21T00:12:43Z",  # before what int64 nanoseconds hold
        "2262-04-12T00:00:00Z",  # after
    ],
)
def test_bad_uids_are_bad_records(text: str) -> None:
    with pytest.raises(BadRecord) as info:
        parse_rfc3339_ns(text)
    assert info.value.reason == "bad_field"


@given(st.integers(MIN_NS, MAX_NS))
def test_formatting_round_trips(value: int) -> None:
    assert parse_rfc3339_ns(iso_from_ns(value)) == value
    assert parse_rfc3339_ns(format_uid(value)) == value


def test_format_uid_matches_kaiko() -> None:
    assert format_uid(ns("2024-08-09T13:47:19")) == "2024-08-09T13:47:19Z"
    assert format_uid(ns("2024-08-09T13:47:19.5")) == "2024-08-09T13:47:19.5Z"


def bad(reason: str, ts_event: str | None = DOC_TS_EVENT, **fields: Any) -> Any:
    return pytest.param(response(ts_event, **fields), reason, id=f"{reason}-{fields}")


@pytest.mark.parametrize(
    ("msg", "reason"),
    [
        bad("missing_field", exchange=""),
        bad("missing_field", code=""),
        bad("missing_field", aggregate=""),
        bad("missing_field", **{"class": ""}),
        bad("bad_field", code="btc:usd"),
        bad("bad_field", exchange="a|b"),
        bad("missing_field", uid=""),
        bad("bad_field", uid="not a time"),
        bad("bad_field", uid="1723211239"),
        bad("bad_field", price=math.nan),
        bad("bad_field", price=math.inf),
        bad("bad_field", price=-math.inf),
        bad("missing_field", ts_event=None),
    ],
)
def test_bad_records_name_a_reason(msg: Any, reason: str) -> None:
    with pytest.raises(BadRecord) as info:
        vwap_tick(msg)
    assert info.value.reason == reason


@pytest.mark.parametrize("field", ["exchange", "class", "code", "aggregate"])
def test_instrument_names_are_bounded(field: str) -> None:
    """The names make the Kafka key, which a dead letter of the event repeats: a name of a
    megabyte would make a dead letter no Kafka record can hold, so it is refused instead."""
    longest = "x" * MAX_NAME_CHARS
    assert longest in vwap_tick(response(**{field: longest})).id
    with pytest.raises(BadRecord) as info:
        vwap_tick(response(**{field: longest * 4096}))
    assert (info.value.reason, info.value.detail) == (
        "bad_field",
        f"{field} is {MAX_NAME_CHARS * 4096} characters, over {MAX_NAME_CHARS}",
    )


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(0, -1), (0, 10**9), (MAX_NS // 10**9 + 1, 0), (MAX_NS // 10**9, 999_999_999), (-(2**40), 0)],
)
def test_ts_event_out_of_range(seconds: int, nanos: int) -> None:
    msg = response(ts_event=None)
    msg.ts_event.seconds = seconds
    msg.ts_event.nanos = nanos
    with pytest.raises(BadRecord, match="out of range"):
        vwap_tick(msg)


def test_gap_event() -> None:
    gap = gap_event(
        "binc:spot:eth-usdt",
        "1s",
        "2024-08-09T13:47:19Z",
        "2024-08-09T13:47:25Z",
        "reconnect",
        source="kaiko.vwap:binc:spot:*:1s",
        detected_at="2024-08-09T13:47:26.000000Z",
    )
    assert gap.type == GAP
    assert gap.key == "binc:spot:eth-usdt"
    assert gap.id == "gap:binc:spot:eth-usdt:1s:2024-08-09T13:47:19Z:2024-08-09T13:47:25Z"
    assert gap.time == gap.data["detected_at"] == "2024-08-09T13:47:26.000000Z"
    assert gap.data["last_before"] == "2024-08-09T13:47:19Z"
    assert gap.data["first_after"] == "2024-08-09T13:47:25Z"
    assert gap.data["source"] == "kaiko.vwap:binc:spot:*:1s"
    assert gap.validation_error() is None
    # the id does not depend on when the gap was seen
    again = gap_event("binc:spot:eth-usdt", "1s", "2024-08-09T13:47:19Z",
                      "2024-08-09T13:47:25Z", "reconnect")  # fmt: skip
    assert again.id == gap.id
    assert again.validation_error() is None
    first = gap_event("k", None, None, "2024-08-09T13:47:25Z", "restart")
    assert first.validation_error() is None


# -- property: arbitrary responses map to valid events or raise BadRecord -----------------

texts = st.text(st.characters(blacklist_categories=["Cs"]), max_size=12)
names = st.sampled_from(["binc", "cbse", "spot", "btc-usd", "1s", "1m", "", "*", "a:b"]) | texts
uids = (
    st.datetimes(
        min_value=datetime(1600, 1, 1), max_value=datetime(2300, 12, 31), timezones=st.just(UTC)
    ).map(lambda d: d.isoformat().replace("+00:00", "Z"))
    | st.from_regex(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,12})?(Z|[+-]\d{2}:\d{2})")
    | texts
)


@st.composite
def responses(draw: st.DrawFn) -> Any:
    msg = response_pb2.StreamAggregatesVWAPResponseV1(
        **{
            "exchange": draw(names),
            "class": draw(names),
            "code": draw(names),
            "aggregate": draw(names),
            "uid": draw(uids),
            "sequence_id": draw(texts),
            "price": draw(st.floats(allow_nan=True, allow_infinity=True)),
        }
    )
    if draw(st.booleans()):
        msg.ts_event.seconds = draw(
            st.integers(MIN_NS // 10**9 - 10, MAX_NS // 10**9 + 10)
            | st.integers(-(2**63), 2**63 - 1)
        )
        msg.ts_event.nanos = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(0, 10**9 - 1))
    return msg


@settings(max_examples=500, deadline=None)
@given(responses())
def test_any_response_is_a_valid_event_or_a_bad_record(msg: Any) -> None:
    try:
        event, key, mark = tick_and_mark(msg)
    except BadRecord:
        with pytest.raises(BadRecord):
            vwap_tick(msg)
        return
    doc = orjson.loads(event.to_json())
    assert validation.first_error(event.type, event.version, doc) is None
    assert event.validation_error() is None
    assert mark_of(doc) == (key, mark) == interval_mark(msg)
    assert doc["data"]["ts_event_ns"] == msg.ts_event.seconds * 10**9 + msg.ts_event.nanos
    assert parse_rfc3339_ns(doc["data"]["ts_event"]) == doc["data"]["ts_event_ns"]
