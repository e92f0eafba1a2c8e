"""Official daily closes (`id` present and not 0) -> `vinter.nav.settlement` events. Pure:
no I/O, no clock, raises BadRecord and nothing else. Which revision to publish is
`settlement_book`'s business."""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import orjson

from bridge.errors import BadRecord
from bridge.events import SETTLEMENT, Event
from bridge.normalize.nav import MAX_INT, MAX_MS, MIN_INT, MIN_MS, SOURCE_REST
from bridge.timefmt import iso_from_ms

SOURCE = SOURCE_REST
MS_PER_DAY = 86_400_000
_EPOCH = date(1970, 1, 1)

NUMBERS = ("open", "high", "low", "close")
STRINGS = ("created_at", "updated_at")
MAPPED = frozenset(("id", "symbol", "date", "timestamp", *NUMBERS, *STRINGS))
DATE_PATTERN = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


# -- one record -> one event -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Daily:
    """One official daily record, type-checked; unknown fields are kept in `extra`."""

    symbol: str
    date: str
    timestamp: int
    upstream_id: int
    close: float
    open: float | None = None
    high: float | None = None
    low: float | None = None
    created_at: str | None = None
    updated_at: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def digest(self) -> str:
        """A short fingerprint of the values a revision reports (open, high, low, close)."""
        values = orjson.dumps([self.open, self.high, self.low, self.close])
        return hashlib.sha256(values).hexdigest()[:16]


def is_official(record: Any) -> bool:
    """True unless the record is an object whose `id` is missing, null or 0 (not official).

    Anything that is not an object counts as official here, so that it is refused as bad
    input rather than silently skipped.
    """
    if not isinstance(record, dict):
        return True
    upstream_id = record.get("id")
    return not (upstream_id is None or (isinstance(upstream_id, int | float) and upstream_id == 0))


def parse_daily(record: Any, *, expected_symbol: str | None = None) -> Daily:
    """Check one upstream daily record; BadRecord if it cannot be an official settlement."""
    if not isinstance(record, dict):
        raise BadRecord(
            "not_an_object", f"a daily record is a JSON object, got {type(record).__name__}"
        )
    if not is_official(record):
        raise BadRecord("not_official", "id is 0 or missing: not an official value")
    symbol = record.get("symbol")
    if not isinstance(symbol, str) or not symbol:
        raise BadRecord("missing_field", "symbol is missing or not a string")
    if expected_symbol is not None and symbol != expected_symbol:
        raise BadRecord("symbol_mismatch", f"got {symbol[:64]!r}, asked for {expected_symbol!r}")
    if not symbol.endswith("-d"):
        raise BadRecord("bad_symbol", f"symbol {symbol[:64]!r} is not a daily symbol (-d)")
    upstream_id = _int(record, "id")
    if upstream_id is None or upstream_id < 1:
        raise BadRecord("bad_field", f"id must be a positive integer, got {upstream_id!r}")
    timestamp = _int(record, "timestamp")
    if timestamp is None:
        raise BadRecord("missing_field", "timestamp is missing")
    if not MIN_MS <= timestamp <= MAX_MS:
        raise BadRecord("bad_field", f"timestamp {timestamp} is not Unix milliseconds")
    day = _string(record, "date")
    if day is None:
        raise BadRecord("missing_field", "date is missing")
    calendar_day = parse_date(day) if DATE_PATTERN.fullmatch(day) else None
    if calendar_day is None:
        raise BadRecord("bad_field", f"date {day[:32]!r} is not YYYY-MM-DD")
    # The date is the calculation date of `timestamp` (the docs' sample: midnight UTC of it);
    # a day either side allows for the CET calculation time. A date far from it would move
    # the checkpoint's horizon (a future date would hide every real close after it).
    if abs((calendar_day - _EPOCH).days - timestamp // MS_PER_DAY) > 1:
        raise BadRecord("bad_field", f"date {day} is not the date of timestamp {timestamp}")
    numbers = {name: _number(record, name) for name in NUMBERS}
    close = numbers["close"]
    if close is None:
        raise BadRecord("missing_field", "close is missing")
    strings = {name: _string(record, name) for name in STRINGS}
    return Daily(
        symbol=symbol,
        date=day,
        timestamp=timestamp,
        upstream_id=upstream_id,
        close=close,
        open=numbers["open"],
        high=numbers["high"],
        low=numbers["low"],
        created_at=strings["created_at"],
        updated_at=strings["updated_at"],
        extra={k: v for k, v in record.items() if k not in MAPPED},
    )


def _int(record: dict[str, Any], name: str) -> int | None:
    value = record.get(name)
    if value is None:
        return None
    if type(value) is float and value.is_integer():  # an integral float counts as an integer
        value = int(value)
    if type(value) is not int:  # exact type: bool is not an integer here
        raise BadRecord("bad_field", f"{name} must be an integer, got {type(value).__name__}")
    if not MIN_INT <= value <= MAX_INT:
        raise BadRecord("bad_field", f"{name} does not fit a 64-bit integer")
    return value


def _number(record: dict[str, Any], name: str) -> float | None:
    value = record.get(name)
    if value is None or (type(value) is float and math.isfinite(value)):
        return value
    if type(value) is int:
        if MIN_INT <= value <= MAX_INT:
            return value
        raise BadRecord("bad_field", f"{name} does not fit a 64-bit integer")
    raise BadRecord("bad_field", f"{name} must be a finite number, got {type(value).__name__}")


def _string(record: dict[str, Any], name: str) -> str | None:
    value = record.get(name)
    if value is None or type(value) is str:
        return value
    raise BadRecord("bad_field", f"{name} must be a string, got {type(value).__name__}")


def event_id(symbol: str, day: str, revision: int) -> str:
    return f"settlement:{symbol}:{day}:{revision}"


def settlement_of(daily: Daily, *, revision: int, supersedes: int | None = None) -> Event:
    """The event for one revision of a checked daily record (BadRecord if off-schema)."""
    if revision < 1 or (supersedes is None) != (revision == 1):
        raise BadRecord("bad_revision", f"revision {revision} cannot supersede {supersedes}")
    data: dict[str, Any] = {
        "symbol": daily.symbol,
        "date": daily.date,
        "revision": revision,
        "supersedes": supersedes,
        "close": daily.close,
        "open": daily.open,
        "high": daily.high,
        "low": daily.low,
        "upstream_id": daily.upstream_id,
        "timestamp": daily.timestamp,
        "created_at": daily.created_at,
        "updated_at": daily.updated_at,
    }
    if daily.extra:
        data["extra"] = dict(daily.extra)
    event = Event(
        type=SETTLEMENT,
        id=event_id(daily.symbol, daily.date, revision),
        source=SOURCE,
        time=iso_from_ms(daily.timestamp),
        key=daily.symbol,
        data=data,
    )
    problem = event.validation_error()
    if problem is not None:
        raise BadRecord("schema_violation", problem)
    event.verified = True  # the publisher need not check it again
    return event


def settlement_event(
    record: Any, *, revision: int, supersedes: int | None = None, expected_symbol: str | None = None
) -> Event:
    """One upstream daily record + its revision -> a `vinter.nav.settlement` event."""
    return settlement_of(
        parse_daily(record, expected_symbol=expected_symbol),
        revision=revision,
        supersedes=supersedes,
    )


# -- checkpoints -----------------------------------------------------------------------------


def parse_date(text: str) -> date | None:
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def midnight_ms(day: date) -> int:
    return (day - date(1970, 1, 1)).days * MS_PER_DAY
