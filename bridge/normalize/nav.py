"""Vinter NAV record -> `vinter.nav.tick` event. Pure: raises BadRecord and nothing else.

The same record schema comes over the WebSocket and the REST endpoint of the symbol's
frequency. Known fields are mapped and type-checked; any other field is kept verbatim in
`extra`, so nothing upstream is dropped.
"""

from __future__ import annotations

import math
from typing import Any

from bridge.errors import BadRecord
from bridge.events import NAV_TICK, Event, iso_from_ms

SOURCE_WS = "/vinter/nav/ws"
SOURCE_REST = "/vinter/nav/rest"
FREQUENCIES = {"d": "daily", "h": "hourly", "r": "real-time"}
NUMBERS = ("open", "high", "low", "close", "value")
STRINGS = ("date", "created_at", "updated_at")
MAPPED = frozenset(("id", "symbol", "timestamp", "hour", *NUMBERS, *STRINGS))
# 1990-01-01 .. 2200-01-01 in ms: anything else is a unit error upstream (s or µs), not a time.
MIN_MS, MAX_MS = 631_152_000_000, 7_258_118_400_000


def frequency_of(symbol: str) -> str:
    """`daily`, `hourly` or `real-time`, from the symbol's `-d` / `-h` / `-r` suffix."""
    freq = FREQUENCIES.get(symbol[-1:]) if symbol[-2:-1] == "-" else None
    if freq is None:
        raise BadRecord("bad_symbol", f"symbol {symbol[:64]!r} does not end in -d, -h or -r")
    return freq


def _int(record: dict[str, Any], field: str) -> int | None:
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord("bad_field", f"{field} must be an integer, got {type(value).__name__}")
    if isinstance(value, float):
        if not value.is_integer():
            raise BadRecord("bad_field", f"{field} must be an integer, got {value!r}")
        value = int(value)
    return value


def _number(record: dict[str, Any], field: str) -> float | int | None:
    value = record.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRecord("bad_field", f"{field} must be a number, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRecord("bad_field", f"{field} must be finite")
    return value


def _string(record: dict[str, Any], field: str) -> str | None:
    value = record.get(field)
    if value is None or isinstance(value, str):
        return value
    raise BadRecord("bad_field", f"{field} must be a string, got {type(value).__name__}")


def nav_tick(record: Any, *, source: str, expected_symbol: str | None = None) -> Event:
    """Map one upstream NAV record; `expected_symbol` is the symbol the socket was opened for."""
    if not isinstance(record, dict):
        raise BadRecord(
            "not_an_object", f"a NAV record is a JSON object, got {type(record).__name__}"
        )
    symbol = record.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise BadRecord("missing_field", "symbol is missing or not a string")
    if expected_symbol is not None and symbol != expected_symbol:
        raise BadRecord("symbol_mismatch", f"got {symbol[:64]!r}, subscribed {expected_symbol!r}")
    frequency = frequency_of(symbol)
    timestamp = _int(record, "timestamp")
    if timestamp is None:
        raise BadRecord("missing_field", "timestamp is missing")
    if not MIN_MS <= timestamp <= MAX_MS:
        raise BadRecord("bad_field", f"timestamp {timestamp} is not Unix milliseconds")
    upstream_id = _int(record, "id")
    data: dict[str, Any] = {
        "symbol": symbol,
        "frequency": frequency,
        "timestamp": timestamp,
        "id": upstream_id,
        "official": upstream_id is not None and upstream_id != 0,
        "hour": _int(record, "hour"),
    }
    for field in STRINGS:
        data[field] = _string(record, field)
    for field in NUMBERS:
        data[field] = _number(record, field)
    if data["close"] is None and data["value"] is None:
        raise BadRecord("missing_field", "neither close nor value is present")
    extra = {k: v for k, v in record.items() if k not in MAPPED}
    if extra:
        data["extra"] = extra
    return Event(
        type=NAV_TICK,
        id=f"nav:{symbol}:{timestamp}",
        source=source,
        time=iso_from_ms(timestamp),
        key=symbol,
        data=data,
    )


def mark_of(doc: dict[str, Any]) -> tuple[str, int] | None:
    """(symbol, timestamp) of a published NAV tick: how far that symbol has been published."""
    data = doc.get("data")
    if doc.get("type") != NAV_TICK or not isinstance(data, dict):
        return None
    symbol, timestamp = data.get("symbol"), data.get("timestamp")
    if isinstance(symbol, str) and isinstance(timestamp, int):
        return symbol, timestamp
    return None
