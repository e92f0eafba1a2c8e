"""Vinter NAV records -> `vinter.nav.tick` events, and the decoders that turn a whole socket
message or REST page into ticks and refusals. Pure: raises BadRecord and nothing else;
known fields are type-checked, any other is kept verbatim in `extra` (identity and
revisions: docs/design.md, "NAV over WebSocket")."""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import Any, Final, TypeVar

import orjson

from bridge.errors import BadRecord
from bridge.events import NAV_TICK, Event
from bridge.marks import Version, content_digest, updated_ms, version_of
from bridge.timefmt import iso_from_ms

#: The schema version of the `vinter.nav.tick` events made here.
NAV_TICK_VERSION = 2
SOURCE_WS = "/vinter/nav/ws"
SOURCE_REST = "/vinter/nav/rest"
FREQUENCIES = {"d": "daily", "h": "hourly", "r": "real-time"}
NUMBERS = ("open", "high", "low", "close", "value")
STRINGS = ("date", "created_at", "updated_at")
#: The start of a tick as the receiver hands it on: its timestamp (Unix ms), then the
#: event's JSON.
TICK_TIMESTAMP: Final = struct.Struct("<q")
#: Bad records of one input (a message, a REST page) refused one by one; the rest of them
#: are folded into one refusal that holds the start of the input.
MAX_REFUSED_PER_INPUT: Final = 100
# 1990-01-01 .. 2200-01-01 in ms: anything else is a unit error upstream (s or µs), not a time.
MIN_MS, MAX_MS = 631_152_000_000, 7_258_118_400_000
# Integers must fit a signed 64-bit integer: what JSON consumers hold, and what orjson writes
# (an integral float such as 1e300 would otherwise become an integer nobody can serialize).
MIN_INT, MAX_INT = -(2**63), 2**63 - 1


def timestamp_of(record: Any) -> int | None:
    """A record's `timestamp` if it is an int (the sort key of every NAV record)."""
    ts = record.get("timestamp") if isinstance(record, dict) else None
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else None


def frequency_of(symbol: str) -> str:
    """`daily`, `hourly` or `real-time`, from the symbol's `-d` / `-h` / `-r` suffix."""
    freq = FREQUENCIES.get(symbol[-1:]) if symbol[-2:-1] == "-" else None
    if freq is None:
        raise BadRecord("bad_symbol", f"symbol {symbol[:64]!r} does not end in -d, -h or -r")
    return freq


# Mapped fields and their JSON types; anything else is kept verbatim in `extra`.
_INT, _NUMBER, _STRING = "integer", "number", "string"
FIELDS = {
    "id": _INT,
    "timestamp": _INT,
    "hour": _INT,
    **dict.fromkeys(NUMBERS, _NUMBER),
    **dict.fromkeys(STRINGS, _STRING),
}
_EMPTY = dict.fromkeys(("id", "hour", *STRINGS, *NUMBERS))
# The exact class of a mapped field's value when it needs no conversion.
_PLAIN = {field: {_INT: int, _NUMBER: float, _STRING: str}[kind] for field, kind in FIELDS.items()}
# Once per symbol, not per record (a failure raises and is not cached).
_frequency = lru_cache(maxsize=4096)(frequency_of)


def _checked(field: str, kind: str, value: Any) -> Any:
    """`value` if it has the field's JSON type (an integral float counts as an integer)."""
    cls = type(value)  # exact types: bool is not a number here
    if kind == _NUMBER:
        if (cls is float and math.isfinite(value)) or (cls is int and MIN_INT <= value <= MAX_INT):
            return value
    elif kind == _INT:
        if cls is float and value.is_integer():
            value, cls = int(value), int
        if cls is int and MIN_INT <= value <= MAX_INT:
            return value
    elif cls is str:
        return value
    if cls is int and kind != _STRING:
        raise BadRecord("bad_field", f"{field} does not fit a 64-bit integer")
    raise BadRecord("bad_field", f"{field} must be a finite {kind}, got {cls.__name__}")


def _symbol(record: Any, expected: str | None) -> str:
    if type(record) is not dict:
        raise BadRecord(
            "not_an_object", f"a NAV record is a JSON object, got {type(record).__name__}"
        )
    symbol = record.get("symbol")
    if type(symbol) is not str or not symbol:
        raise BadRecord("missing_field", "symbol is missing or not a string")
    if expected is not None and symbol != expected:
        raise BadRecord("symbol_mismatch", f"got {symbol[:64]!r}, subscribed {expected!r}")
    return symbol


def nav_tick(
    record: Any, *, source: str, expected_symbol: str | None = None, revision: bool = True
) -> Event:
    """Map one upstream NAV record as revision 1 of its tick; `expected_symbol` is the symbol
    the socket was opened for. `revision=False` leaves the revision fields out."""
    symbol = _symbol(record, expected_symbol)
    data: dict[str, Any] = {"symbol": symbol, "frequency": _frequency(symbol), **_EMPTY}
    extra: dict[str, Any] | None = None
    for field, value in record.items():
        plain = _PLAIN.get(field)
        if plain is None:
            if field != "symbol":
                if extra is None:
                    extra = {}
                extra[field] = value
        elif value is not None:
            cls = type(value)  # the common case inline: a call per field was a tenth of this
            if cls is plain and (
                cls is str
                or (cls is int and MIN_INT <= value <= MAX_INT)
                or (cls is float and value - value == 0.0)  # finite: inf - inf and nan are nan
            ):
                data[field] = value
            else:
                data[field] = _checked(field, FIELDS[field], value)
    timestamp = data.pop("timestamp", None)
    if timestamp is None:
        raise BadRecord("missing_field", "timestamp is missing")
    if not MIN_MS <= timestamp <= MAX_MS:
        raise BadRecord("bad_field", f"timestamp {timestamp} is not Unix milliseconds")
    if data["close"] is None and data["value"] is None:
        raise BadRecord("missing_field", "neither close nor value is present")
    data["timestamp"] = timestamp
    upstream_id = data["id"]
    data["official"] = upstream_id is not None and upstream_id != 0
    if extra:
        data["extra"] = extra
    if revision:
        data["revision"] = 1
        data["supersedes"] = None
    event = Event(  # positional, as in `bridge.normalize.vwap`: once per message
        NAV_TICK,  # type
        event_id(symbol, timestamp, 1),  # id
        source,  # source
        iso_from_ms(timestamp),  # time
        symbol,  # key
        data,  # data
        NAV_TICK_VERSION,  # version
    )
    event.verified = True  # proven by tests/unit/test_decoders.py
    return event


def nav_tick_versioned(
    record: Any, *, source: str, expected_symbol: str | None = None
) -> tuple[Event, Version]:
    """`nav_tick`, revision 1, with its `Version` (the content digest taken before the
    revision fields are added, so no copy of the data is needed)."""
    event = nav_tick(record, source=source, expected_symbol=expected_symbol, revision=False)
    data = event.data
    fields = (1, content_digest(data), updated_ms(data["updated_at"]), data["official"])
    version = tuple.__new__(Version, fields)  # skips NamedTuple's Python-level __new__
    data["revision"] = 1
    data["supersedes"] = None
    return event, version


def event_id(symbol: str, timestamp: int, revision: int) -> str:
    """The id of one revision of a tick: the same upstream content always gets the same."""
    return f"nav:{symbol}:{timestamp}:{revision}"


def revise(event: Event, revision: int) -> Event:
    """`event` (revision 1 of its tick) as revision `revision`, superseding the one before."""
    data = event.data
    data["revision"] = revision
    data["supersedes"] = revision - 1 if revision > 1 else None
    event.id = event_id(data["symbol"], data["timestamp"], revision)
    return event


def revise_json(doc: dict[str, Any], revision: int) -> dict[str, Any]:
    """An event's envelope, as parsed from its JSON, made revision `revision`."""
    data = doc["data"]
    data["revision"] = revision
    data["supersedes"] = revision - 1 if revision > 1 else None
    doc["id"] = event_id(data["symbol"], data["timestamp"], revision)
    return doc


def mark_of(doc: dict[str, Any]) -> tuple[str, int, Version] | None:
    """(symbol, timestamp, version) of a published NAV tick: how far that symbol has been
    published, and what was published for that timestamp."""
    data = doc.get("data")
    if doc.get("type") != NAV_TICK or not isinstance(data, dict):
        return None
    symbol, timestamp = data.get("symbol"), data.get("timestamp")
    if isinstance(symbol, str) and isinstance(timestamp, int):
        return symbol, timestamp, version_of(data)
    return None


def newest_per_timestamp(decoded: list[tuple[Event, Version]]) -> list[tuple[Event, Version]]:
    """Of ticks in timestamp order (a REST page), one per timestamp: the latest `updated_at`
    wins, then an official record (`id != 0`) over an indicative one, then the later in the
    page."""
    out: list[tuple[Event, Version]] = []
    for event, version in decoded:
        if out and out[-1][0].data["timestamp"] == event.data["timestamp"]:
            if not out[-1][1].outranks(version):
                out[-1] = (event, version)
            continue
        out.append((event, version))
    return out


# -- the decoders: whole inputs -> ticks and refusals -----------------------------------------

_T = TypeVar("_T")


def decode_message(raw: bytes, symbol: str) -> tuple[list[Event], list[BadRecord]]:
    """One message of `symbol`'s socket (a record, or an array of them) as revision-1 ticks
    and refusals, each refusal holding its input. Runs in the receiver child."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [BadRecord("bad_json", str(exc), raw=raw)]
    if type(doc) is not list:
        try:
            return [nav_tick(doc, source=SOURCE_WS, expected_symbol=symbol)], []
        except BadRecord as exc:
            exc.raw = raw
            return [], [exc]
    return _each(doc, raw, lambda item: nav_tick(item, source=SOURCE_WS, expected_symbol=symbol))


def tick_bytes(event: Event) -> bytes:
    """A tick as the receiver hands it on: `TICK_TIMESTAMP`, then the event's JSON."""
    # not `event.to_json()`: the concatenation already copies the JSON out of orjson's
    # oversized buffer, which is all `to_json` adds
    return _pack_timestamp(event.data["timestamp"]) + orjson.dumps(event.envelope())


_pack_timestamp = TICK_TIMESTAMP.pack


def decode_records(
    records: list[Any], symbol: str
) -> tuple[list[tuple[Event, Version]], list[BadRecord]]:
    """A REST page of `symbol` (in timestamp order) as revision-1 ticks with their versions,
    and refusals."""
    return _each(
        records,
        records,
        lambda record: nav_tick_versioned(record, source=SOURCE_REST, expected_symbol=symbol),
    )


def _each(
    items: list[Any], whole: bytes | list[Any], decode: Callable[[Any], _T]
) -> tuple[list[_T], list[BadRecord]]:
    """`decode` applied to each item of one input: what it made, and what it refused."""
    made: list[_T] = []
    refused = _Refused(whole)
    for item in items:
        try:
            made.append(decode(item))
        except BadRecord as exc:
            refused.add(exc, item)
    return made, refused.done()


def dumps_or_repr(value: Any) -> bytes | str:
    """A value as JSON for a dead letter, or its repr when JSON cannot hold it."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return repr(value)


class _Refused:
    """The refusals of one input: the first `MAX_REFUSED_PER_INPUT` one by one, the others
    counted and folded into one that holds the whole input (a huge bad message costs a few
    dead letters, not one per record)."""

    def __init__(self, whole: bytes | list[Any]) -> None:
        self._whole = whole
        self._refused: list[BadRecord] = []
        self._folded = 0

    def add(self, exc: BadRecord, record: Any) -> None:
        if len(self._refused) < MAX_REFUSED_PER_INPUT:
            if exc.raw is None:
                exc.raw = dumps_or_repr(record)
            self._refused.append(exc)
        else:
            self._folded += 1

    def done(self) -> list[BadRecord]:
        if self._folded:
            detail = (
                f"{self._folded} more bad records; the first {len(self._refused)} were "
                "dead-lettered one by one"
            )
            whole = self._whole
            raw = whole if isinstance(whole, bytes) else dumps_or_repr(whole)
            self._refused.append(BadRecord("too_many_bad_records", detail, raw=raw))
        return self._refused
