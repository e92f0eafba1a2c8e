"""Kaiko VWAP responses -> `kaiko.vwap.tick` events and interval marks (the `uid` as Unix
nanoseconds, per instrument and aggregate). Pure: raises BadRecord and nothing else; every
upstream field is kept, `ts_event` at full precision. It runs once per streamed message, so
it reads attributes directly and caches the conversions that repeat across messages."""

from __future__ import annotations

import re
from functools import lru_cache
from math import isfinite
from typing import Any, Final

from google.protobuf import text_format
from google.protobuf.message import DecodeError
from kaikosdk.stream.aggregates_vwap_v1 import response_pb2

from bridge.errors import BadRecord
from bridge.events import GAP, VWAP_TICK, Event, utc_now
from bridge.timefmt import DAY_S, days_from_civil, iso_from_ns, second_text

SOURCE = "/kaiko/vwap"

# Times are Unix nanoseconds in a signed 64-bit integer (JSON consumers, checkpoints):
# 1677-09-21T00:12:43.145224192Z .. 2262-04-11T23:47:16.854775807Z.
MIN_NS, MAX_NS = -(2**63), 2**63 - 1
_NS = 1_000_000_000

# RFC 3339 date-time (section 5.6); `T`, `Z` case-insensitive; any number of fraction digits.
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_MONTH_DAYS = (31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

# Conversions repeat across messages (all instruments of one interval share a uid, and an
# instrument's names never change); bounded caches keep them off the per-message path.
_CACHE_SIZE = 4096
_Names = tuple[str, str, str]
#: The longest instrument name taken (exchange, class, code, aggregate: Kaiko's are a few
#: dozen characters). The names make the Kafka key, which every dead letter of the event
#: repeats whole: a key of a megabyte makes a dead letter no Kafka record can hold.
MAX_NAME_CHARS = 256


def _leap(year: int) -> bool:
    return year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)


@lru_cache(maxsize=_CACHE_SIZE)  # failures are not cached: they raise
def parse_rfc3339_ns(text: str) -> int:
    """An RFC 3339 date-time -> Unix nanoseconds (fraction digits beyond 9 are truncated).

    Raises BadRecord for anything that is not one, including impossible dates and times.
    """
    m = _RFC3339.fullmatch(text)
    if m is None:
        raise BadRecord("bad_field", f"{text[:64]!r} is not an RFC 3339 date-time")
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    if not (
        1 <= month <= 12
        and 1 <= day <= (29 if month == 2 and _leap(year) else _MONTH_DAYS[month - 1])
        and hour <= 23
        and minute <= 59
        and second <= 59  # a leap second (60) never starts an interval
    ):
        raise BadRecord("bad_field", f"{text[:64]!r} is not a valid date-time")
    fraction = m.group(7) or ""
    ns = int(fraction[:9].ljust(9, "0")) if fraction else 0
    offset_s = 0
    if m.group(9) is not None:
        off_h, off_m = int(m.group(10)), int(m.group(11))
        if off_h > 23 or off_m > 59:
            raise BadRecord("bad_field", f"{text[:64]!r} has an invalid UTC offset")
        offset_s = (off_h * 3600 + off_m * 60) * (1 if m.group(9) == "+" else -1)
    seconds = (
        days_from_civil(year, month, day) * DAY_S + hour * 3600 + minute * 60 + second - offset_s
    )
    value = seconds * _NS + ns
    if not MIN_NS <= value <= MAX_NS:
        raise BadRecord("bad_field", f"{text[:64]!r} is out of range (years 1678-2261)")
    return value


def format_uid(ns: int) -> str:
    """Unix nanoseconds -> an interval uid as Kaiko writes it (`...:19Z`; fraction if any)."""
    seconds, nanos = divmod(ns, _NS)
    if nanos == 0:
        return f"{second_text(seconds)}Z"
    return f"{second_text(seconds)}.{nanos:09d}".rstrip("0") + "Z"


# -- fields ------------------------------------------------------------------------------


def _name(value: Any, field: str) -> str:
    if not isinstance(value, str) or not value:
        raise BadRecord("missing_field", f"{field} is empty")
    if len(value) > MAX_NAME_CHARS:
        raise BadRecord("bad_field", f"{field} is {len(value)} characters, over {MAX_NAME_CHARS}")
    if ":" in value or "|" in value:  # would make keys and ids ambiguous
        raise BadRecord("bad_field", f"{field} {value[:64]!r} contains ':' or '|'")
    return value


def instrument_key(exchange: str, instrument_class: str, code: str) -> str:
    """The Kafka key of an instrument: `{exchange}:{instrument_class}:{code}`."""
    return f"{exchange}:{instrument_class}:{code}"


_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def aggregate_seconds(aggregate: str) -> int:
    """`1s` -> 1, `5m` -> 300 (the config has checked the `<n><s|m|h|d>` shape)."""
    return int(aggregate[:-1]) * _UNIT_S[aggregate[-1]]


def mark_key(key: str, aggregate: str) -> str:
    """The MarkBook key: one mark per instrument and aggregate."""
    return f"{key}|{aggregate}"


@lru_cache(maxsize=_CACHE_SIZE)
def _instrument(exchange: Any, instrument_class: Any, code: Any, aggregate: Any) -> _Names:
    """(key, mark key, id prefix) of one instrument and aggregate, checked once, cached."""
    key = instrument_key(
        _name(exchange, "exchange"),
        _name(instrument_class, "class"),
        _name(code, "code"),
    )
    aggregate = _name(aggregate, "aggregate")
    return key, mark_key(key, aggregate), f"vwap:{key}:{aggregate}:"


def interval_mark(msg: Any) -> tuple[str, int]:
    """(mark key, interval start in Unix ns) of a live message; BadRecord if unmappable."""
    names = _instrument(msg.exchange, getattr(msg, "class"), msg.code, msg.aggregate)
    return names[1], parse_rfc3339_ns(msg.uid)


_parse = response_pb2.StreamAggregatesVWAPResponseV1.FromString


def decode_response(raw: bytes) -> tuple[Event, str, int]:
    """One streamed response, as received, -> (event, mark key, interval ns); raises
    BadRecord holding the input (its text form when it parsed) if it cannot be one."""
    try:
        msg = _parse(raw)
    except DecodeError:
        raise BadRecord("undecodable", "not a VWAP response", raw=raw) from None
    try:
        return tick_and_mark(msg)
    except BadRecord as exc:
        exc.raw = text_format.MessageToString(msg, as_one_line=True)
        raise


def vwap_tick(msg: Any) -> Event:
    """Map one `StreamAggregatesVWAPResponseV1` to a `kaiko.vwap.tick` event."""
    return tick_and_mark(msg)[0]


def tick_and_mark(msg: Any) -> tuple[Event, str, int]:
    """`vwap_tick` and `interval_mark` in one pass: (event, mark key, interval ns)."""
    exchange = msg.exchange
    instrument_class = getattr(msg, "class")
    code = msg.code
    aggregate = msg.aggregate
    key, mkey, id_prefix = _instrument(exchange, instrument_class, code, aggregate)
    uid = msg.uid
    if not uid:
        raise BadRecord("missing_field", "uid is empty")
    mark = parse_rfc3339_ns(uid)
    price = msg.price
    if not isfinite(price):
        raise BadRecord("bad_field", f"price {price!r} is not finite")
    if not msg.HasField("ts_event"):
        raise BadRecord("missing_field", "ts_event is unset")
    ts = msg.ts_event
    seconds: int = ts.seconds
    nanos: int = ts.nanos
    ts_ns = seconds * _NS + nanos
    if not (0 <= nanos < _NS and MIN_NS <= ts_ns <= MAX_NS):
        raise BadRecord("bad_field", f"ts_event {seconds}s {nanos}ns is out of range")
    ts_event = iso_from_ns(ts_ns)
    event = Event(  # positional: a third cheaper than keywords, once per message
        VWAP_TICK,  # type
        id_prefix + uid,  # id
        SOURCE,  # source
        ts_event,  # time
        key,  # key
        {
            "exchange": exchange,
            "instrument_class": instrument_class,
            "code": code,
            "aggregate": aggregate,
            "uid": uid,
            "price": price,
            "ts_event": ts_event,
            "ts_event_ns": ts_ns,
            "sequence_id": msg.sequence_id,
        },
    )
    event.verified = True  # proven by tests/unit/test_decoders.py
    return event, mkey, mark


def mark_of(doc: dict[str, Any]) -> tuple[str, int] | None:
    """(mark key, interval ns) of a published VWAP tick read back from Kafka, else None."""
    data = doc.get("data")
    key = doc.get("subject")
    if doc.get("type") != VWAP_TICK or not isinstance(data, dict) or not isinstance(key, str):
        return None
    aggregate, uid = data.get("aggregate"), data.get("uid")
    if not isinstance(aggregate, str) or not isinstance(uid, str):
        return None
    try:
        return mark_key(key, aggregate), parse_rfc3339_ns(uid)
    except BadRecord:
        return None


def gap_event(
    key: str,
    aggregate: str | None,
    last_before_uid: str | None,
    first_after_uid: str,
    reason: str,
    *,
    source: str = SOURCE,
    detected_at: str | None = None,
) -> Event:
    """A `bridge.gap` event: intervals between the two uids (exclusive) may be missing.

    Its id depends only on the key, aggregate and the two uids, so the same gap reported
    twice has the same id. `detected_at` defaults to now.
    """
    detected = detected_at or utc_now()
    return Event(
        type=GAP,
        id=f"gap:{key}:{aggregate or ''}:{last_before_uid or ''}:{first_after_uid}",
        source=SOURCE,
        time=detected,
        key=key,
        data={
            "source": source,
            "key": key,
            "aggregate": aggregate,
            "reason": reason,
            "last_before": last_before_uid,
            "first_after": first_after_uid,
            "detected_at": detected,
        },
    )
