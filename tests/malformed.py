"""Hand-written malformed upstream input, each case with the reason the bridge must give it.

Three inputs, read from the vendor pages in the upstream documentation:

* NAV WebSocket messages: one JSON record, or a JSON array of records, on the socket of one
  symbol (`ws_cases`, `nav_record_cases`);
* REST response bodies of `nav_daily`, `nav_hourly` and `nav_real_time`: the envelope
  `{"result", "message", "data": [...], "params"}` (`body_cases`), and the daily records
  inside it that cannot be official settlements (`daily_record_cases`);
* Kaiko `StreamAggregatesVWAPResponseV1` messages (`vwap_cases`).

Record cases start from a valid record and break one thing, so each tests one rule. The unit
table builds them around the vendor docs' samples; the end-to-end test builds them around
live simulator records, so that every case is refused for its own defect and nothing else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from kaikosdk.stream.aggregates_vwap_v1 import response_pb2

from bridge.normalize.nav import MAX_MS, MIN_MS

Record = Mapping[str, Any]

NOT_JSON = "bad_json"
BAD_BODY = "bad_body"
NOT_AN_OBJECT = "not_an_object"
MISSING = "missing_field"
BAD_FIELD = "bad_field"
MISMATCH = "symbol_mismatch"


@dataclass(frozen=True)
class WsCase:
    """One WebSocket message: `str` goes as a text frame, `bytes` as a binary frame."""

    name: str
    message: str | bytes
    reason: str


@dataclass(frozen=True)
class RecordCase:
    """One record (any JSON value) inside an otherwise valid message or body."""

    name: str
    record: Any
    reason: str


@dataclass(frozen=True)
class BodyCase:
    """One whole REST response body."""

    name: str
    body: bytes
    reason: str


@dataclass(frozen=True)
class VwapCase:
    """One response message of the VWAP stream."""

    name: str
    message: Any
    reason: str


def dumps(value: Any) -> str:
    """JSON text as an upstream could write it (the standard library keeps big integers)."""
    return json.dumps(value, separators=(",", ":"))


def _with(record: Record, **fields: Any) -> dict[str, Any]:
    return {**record, **fields}


def _without(record: Record, *names: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in names}


def _value_field(record: Record) -> str:
    """`close` for daily and hourly records, `value` for real-time ones."""
    return "value" if "value" in record else "close"


# -- NAV records (WebSocket messages and hourly / real-time REST bodies) ---------------------


def nav_record_cases(base: Record) -> list[RecordCase]:
    """Records that `nav_tick` must refuse; `base` is a valid record of the socket's symbol."""
    symbol = str(base["symbol"])
    ts = int(base["timestamp"])
    value = _value_field(base)
    cases = [
        ("null record", None, NOT_AN_OBJECT),
        ("a string", "vnfa", NOT_AN_OBJECT),
        ("a number", 42, NOT_AN_OBJECT),
        ("a boolean", True, NOT_AN_OBJECT),
        ("a nested array", [[dict(base)]], NOT_AN_OBJECT),  # a batch holding a batch
        ("empty object", {}, MISSING),
        ("symbol missing", _without(base, "symbol"), MISSING),
        ("symbol null", _with(base, symbol=None), MISSING),
        ("symbol a number", _with(base, symbol=42), MISSING),
        ("symbol empty", _with(base, symbol=""), MISSING),
        ("symbol of another index", _with(base, symbol="zz" + symbol), MISMATCH),
        ("symbol in upper case", _with(base, symbol=symbol.upper()), MISMATCH),
        ("timestamp missing", _without(base, "timestamp"), MISSING),
        ("timestamp null", _with(base, timestamp=None), MISSING),
        ("timestamp a numeric string", _with(base, timestamp=str(ts)), BAD_FIELD),
        ("timestamp an ISO string", _with(base, timestamp="2023-03-01T08:00:01Z"), BAD_FIELD),
        ("timestamp in seconds", _with(base, timestamp=ts // 1000), BAD_FIELD),
        ("timestamp in microseconds", _with(base, timestamp=ts * 1000), BAD_FIELD),
        ("timestamp zero", _with(base, timestamp=0), BAD_FIELD),
        ("timestamp negative", _with(base, timestamp=-ts), BAD_FIELD),
        ("timestamp before 1990", _with(base, timestamp=MIN_MS - 1), BAD_FIELD),
        ("timestamp after 2200", _with(base, timestamp=MAX_MS + 1), BAD_FIELD),
        ("timestamp fractional", _with(base, timestamp=ts + 0.5), BAD_FIELD),
        ("timestamp a boolean", _with(base, timestamp=True), BAD_FIELD),
        ("timestamp past 64 bits", _with(base, timestamp=ts * 10**10), BAD_FIELD),
        ("no value and no close", _without(base, "value", "close"), MISSING),
        ("value and close null", _with(base, value=None, close=None), MISSING),
        (f"{value} a string", _with(base, **{value: "100.8"}), BAD_FIELD),
        (f"{value} a boolean", _with(base, **{value: False}), BAD_FIELD),
        (f"{value} an array", _with(base, **{value: [100.8]}), BAD_FIELD),
        (f"{value} an object", _with(base, **{value: {"usd": 100.8}}), BAD_FIELD),
        # an integer literal past int64 (JSON consumers hold 64 bits; orjson reads it as int)
        (f"{value} an integer past int64", _with(base, **{value: 2**63}), BAD_FIELD),
        ("open not a number", _with(base, open="n/a"), BAD_FIELD),
        ("id a string", _with(base, id="7"), BAD_FIELD),
        ("id fractional", _with(base, id=7.5), BAD_FIELD),
        # regression: an integral float past 64 bits became an event orjson cannot write
        ("id 1e20", _with(base, id=1e20), BAD_FIELD),
        ("hour 1e300", _with(base, hour=1e300), BAD_FIELD),
        ("hour a string", _with(base, hour="8"), BAD_FIELD),
        ("date a number", _with(base, date=20230301), BAD_FIELD),
        ("created_at a number", _with(base, created_at=1677657601000), BAD_FIELD),
        ("updated_at an object", _with(base, updated_at={}), BAD_FIELD),
    ]
    return [RecordCase(name, record, reason) for name, record, reason in cases]


def ws_cases(base: Record) -> list[WsCase]:
    """Every WebSocket case: broken JSON text, then each NAV record case as its own message."""
    text = dumps(base)
    value = _value_field(base)
    raw: list[tuple[str, str | bytes, str]] = [
        ("empty message", "", NOT_JSON),
        ("plain text", "hello", NOT_JSON),
        ("HTML error page", "<html><body>502 Bad Gateway</body></html>", NOT_JSON),
        ("truncated JSON", text[: len(text) // 2], NOT_JSON),
        ("trailing garbage", text + "garbage", NOT_JSON),
        ("two records back to back", text + text, NOT_JSON),
        ("trailing comma", text[:-1] + ",}", NOT_JSON),
        ("single quotes", text.replace('"', "'"), NOT_JSON),
        ("NaN literal", text.replace(f'"{value}":', f'"{value}":NaN,"x":'), NOT_JSON),
        (
            "number overflowing a double",
            text.replace(f'"{value}":', f'"{value}":1e400,"x":'),
            NOT_JSON,
        ),
        ("lone surrogate escape", text.replace('"symbol":"', '"symbol":"\\ud800'), NOT_JSON),
        ("invalid UTF-8 in a binary frame", b"\xff\xfe" + text.encode(), NOT_JSON),
        ("UTF-8 byte order mark", "\ufeff" + text, NOT_JSON),
        ("only whitespace", " \n\t ", NOT_JSON),
        # duplicate keys: the last one counts, and here it is bad
        ("duplicate timestamp key", text[:-1] + ',"timestamp":"later"}', BAD_FIELD),
        ("array holding one bad record", dumps([_without(base, "timestamp")]), MISSING),
    ]
    cases = [WsCase(name, message, reason) for name, message, reason in raw]
    cases += [
        WsCase(f"record: {c.name}", dumps(c.record), c.reason) for c in nav_record_cases(base)
    ]
    return cases


# -- REST bodies ----------------------------------------------------------------------------


def envelope(records: list[Any], symbol: str) -> bytes:
    """A documented success body around `records`."""
    body = {
        "result": "success",
        "message": "Success",
        "data": records,
        "params": {"symbol": symbol},
    }
    return dumps(body).encode()


def body_cases(base: Record) -> list[BodyCase]:
    """Whole bodies that are not the documented envelope (any endpoint): `bad_body`."""
    symbol = str(base["symbol"])
    good = envelope([dict(base)], symbol)
    text = good.decode()
    cases: list[tuple[str, str | bytes]] = [
        ("empty body", b""),
        ("HTML error page", b"<html><body>504 Gateway Time-out</body></html>"),
        ("truncated JSON", good[: len(good) // 2]),
        ("trailing garbage", good + b"\x00garbage"),
        ("not UTF-8", b"\xff" + good),
        ("JSON null", b"null"),
        ("a bare array of records", dumps([dict(base)]).encode()),
        ("a bare record", dumps(dict(base)).encode()),
        ("no data", dumps({"result": "success", "message": "Success"}).encode()),
        ("data null", dumps({"result": "success", "data": None}).encode()),
        ("data an object", dumps({"result": "success", "data": dict(base)}).encode()),
        ("data a string", dumps({"result": "success", "data": "[]"}).encode()),
        ("result error", dumps({"result": "error", "message": "Invalid API key.", "data": []})),
        ("result null", dumps({"result": None, "message": "", "data": [dict(base)]})),
        ("duplicate data key, the last null", text[:-1] + ',"data":null}'),
        ("number overflowing a double", text.replace('"data":', '"x":1e999,"data":')),
    ]
    return [
        BodyCase(name, body if isinstance(body, bytes) else body.encode(), BAD_BODY)
        for name, body in cases
    ]


def daily_record_cases(base: Record) -> list[RecordCase]:
    """Official-looking daily records that cannot be settlements; `base` is a valid one."""
    symbol = str(base["symbol"])
    ts = int(base["timestamp"])
    cases = [
        ("a number", 42, NOT_AN_OBJECT),
        ("a string", "2023-02-28", NOT_AN_OBJECT),
        ("an array", [dict(base)], NOT_AN_OBJECT),
        ("id a string", _with(base, id="2068"), BAD_FIELD),
        ("id negative", _with(base, id=-5), BAD_FIELD),
        ("id fractional", _with(base, id=2068.5), BAD_FIELD),
        ("id a boolean", _with(base, id=True), BAD_FIELD),
        # regression: id 1e20 became a settlement that orjson could not write (poll failed)
        ("id 1e20", _with(base, id=1e20), BAD_FIELD),
        ("symbol missing", _without(base, "symbol"), MISSING),
        ("symbol of another index", _with(base, symbol="zz" + symbol), MISMATCH),
        ("symbol of the hourly index", _with(base, symbol=symbol[:-1] + "h"), MISMATCH),
        ("timestamp missing", _without(base, "timestamp"), MISSING),
        ("timestamp a string", _with(base, timestamp=str(ts)), BAD_FIELD),
        ("timestamp in seconds", _with(base, timestamp=ts // 1000), BAD_FIELD),
        ("timestamp in microseconds", _with(base, timestamp=ts * 1000), BAD_FIELD),
        ("date missing", _without(base, "date"), MISSING),
        ("date a number", _with(base, date=20230228), BAD_FIELD),
        ("date DD/MM/YYYY", _with(base, date="28/02/2023"), BAD_FIELD),
        ("date February 30th", _with(base, date="2023-02-30"), BAD_FIELD),
        ("date with a time", _with(base, date="2023-02-28T00:00:00Z"), BAD_FIELD),
        # regression: year 1 overflowed the horizon arithmetic (the poll crashed)
        ("date in year 1", _with(base, date="0001-01-01"), BAD_FIELD),
        # regression: a future date moved the horizon past every real close to come
        ("date in the future", _with(base, date="2150-01-01"), BAD_FIELD),
        ("date a week off its timestamp", _with(base, date=_shift_date(base, 7)), BAD_FIELD),
        ("close missing", _without(base, "close"), MISSING),
        ("close null", _with(base, close=None), MISSING),
        ("close a string", _with(base, close="98.63"), BAD_FIELD),
        ("close an integer past int64", _with(base, close=2**63), BAD_FIELD),
        ("high a string", _with(base, high="NaN"), BAD_FIELD),
        ("updated_at a number", _with(base, updated_at=1677542400000), BAD_FIELD),
    ]
    return [RecordCase(name, record, reason) for name, record, reason in cases]


def _shift_date(record: Record, days: int) -> str:
    return (date.fromisoformat(str(record["date"])) + timedelta(days=days)).isoformat()


def rest_nav_body_cases(base: Record) -> list[BodyCase]:
    """Hourly / real-time bodies: each NAV record case alone in a valid envelope."""
    symbol = str(base["symbol"])
    return [
        BodyCase(f"record: {c.name}", envelope([c.record], symbol), c.reason)
        for c in nav_record_cases(base)
    ]


# -- VWAP responses -------------------------------------------------------------------------

DOC_VWAP: dict[str, Any] = {
    "aggregate": "1s",
    "class": "spot",
    "code": "eth-usdt",
    "exchange": "binc",
    "price": 2591.3221372276307,
    "uid": "2024-08-09T13:47:19Z",
    "sequence_id": "",
}
DOC_TS_EVENT = (1_723_211_240, 689_338_450)  # 2024-08-09T13:47:20.689338450Z


def vwap_message(fields: Mapping[str, Any], ts_event: tuple[int, int] | None) -> Any:
    """A response message; `ts_event` as (seconds, nanos), or None to leave it unset."""
    msg = response_pb2.StreamAggregatesVWAPResponseV1(**fields)
    if ts_event is not None:
        msg.ts_event.seconds, msg.ts_event.nanos = ts_event
    return msg


def vwap_cases(
    base: Mapping[str, Any] = DOC_VWAP, ts_event: tuple[int, int] = DOC_TS_EVENT
) -> list[VwapCase]:
    """Responses `tick_and_mark` must refuse; `base` (and `ts_event`) make a valid one."""
    seconds, nanos = ts_event
    big = 10**11  # seconds: year 5138, past what int64 nanoseconds hold
    fields_cases: list[tuple[str, dict[str, Any], str]] = [
        ("exchange empty", {"exchange": ""}, MISSING),
        ("class empty", {"class": ""}, MISSING),
        ("code empty", {"code": ""}, MISSING),
        ("aggregate empty", {"aggregate": ""}, MISSING),
        ("exchange with a colon", {"exchange": "cb:se"}, BAD_FIELD),
        ("code with a bar", {"code": "btc|usd"}, BAD_FIELD),
        ("uid empty", {"uid": ""}, MISSING),
        ("uid a date only", {"uid": "2024-08-09"}, BAD_FIELD),
        ("uid without offset", {"uid": "2024-08-09T13:47:19"}, BAD_FIELD),
        ("uid with a space", {"uid": "2024-08-09 13:47:19Z"}, BAD_FIELD),
        ("uid February 30th", {"uid": "2024-02-30T13:47:19Z"}, BAD_FIELD),
        ("uid hour 24", {"uid": "2024-08-09T24:00:00Z"}, BAD_FIELD),
        ("uid leap second", {"uid": "2024-08-09T13:47:60Z"}, BAD_FIELD),
        ("uid Unix seconds", {"uid": "1723211239"}, BAD_FIELD),
        ("uid trailing garbage", {"uid": "2024-08-09T13:47:19Zjunk"}, BAD_FIELD),
        ("uid non-ASCII digits", {"uid": "٢٠٢٤-08-09T13:47:19Z"}, BAD_FIELD),
        ("uid year 9999", {"uid": "9999-08-09T13:47:19Z"}, BAD_FIELD),
        ("uid offset +24:00", {"uid": "2024-08-09T13:47:19+24:00"}, BAD_FIELD),
        ("price NaN", {"price": float("nan")}, BAD_FIELD),
        ("price +infinity", {"price": float("inf")}, BAD_FIELD),
        ("price -infinity", {"price": float("-inf")}, BAD_FIELD),
    ]
    cases = [
        VwapCase(name, vwap_message({**base, **fields}, ts_event), reason)
        for name, fields, reason in fields_cases
    ]
    ts_cases: list[tuple[str, tuple[int, int] | None, str]] = [
        ("ts_event unset", None, MISSING),
        ("ts_event nanos negative", (seconds, -1), BAD_FIELD),
        ("ts_event nanos a whole second", (seconds, 1_000_000_000), BAD_FIELD),
        ("ts_event past 2262", (big, nanos), BAD_FIELD),
        ("ts_event before 1677", (-big, nanos), BAD_FIELD),
    ]
    cases += [VwapCase(name, vwap_message(base, ts), reason) for name, ts, reason in ts_cases]
    return cases
