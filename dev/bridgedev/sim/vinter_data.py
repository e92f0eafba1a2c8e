"""Deterministic Vinter NAV records for the Vinter simulator.

Record shapes follow the vendor pages (``nav_daily``, ``nav_hourly``); the real-time shape is
not documented, so it is ``id``, ``symbol``, ``created_at``, ``value``, ``timestamp``, ``date``.

* Daily: ``timestamp``/``created_at`` are midnight UTC of ``date`` (as in the vendor sample) and
  ``updated_at`` starts equal to ``created_at``; :meth:`Series.correct` moves it later.
* Hourly: ``timestamp``/``created_at`` are the start of the hour, ``hour`` is the UTC hour.
* ``id`` grows per frequency (one source table each); ``id == 0`` marks an unofficial value.
"""

from __future__ import annotations

import base64
import bisect
import random
import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from typing import Any

# A JSON object as served; values are int, float or str.
Record = dict[str, Any]

MS_PER_DAY = 86_400_000


class Frequency(StrEnum):
    """Frequency of a NAV symbol, read from the symbol's suffix (``-d``, ``-h``, ``-r``)."""

    DAILY = "d"
    HOURLY = "h"
    REAL_TIME = "r"

    @classmethod
    def of(cls, symbol: str) -> Frequency:
        suffix = symbol.rsplit("-", 1)[-1] if "-" in symbol else ""
        try:
            return cls(suffix)
        except ValueError:
            raise ValueError(
                f"symbol {symbol!r} must end in -d (daily), -h (hourly) or -r (real-time)"
            ) from None


DEFAULT_STEPS: Mapping[Frequency, timedelta] = {
    Frequency.DAILY: timedelta(days=1),
    Frequency.HOURLY: timedelta(hours=1),
    Frequency.REAL_TIME: timedelta(seconds=1),
}

# First official id per source table, so ids look like the vendor's and never collide with 0.
_ID_BASE: Mapping[Frequency, int] = {
    Frequency.DAILY: 1_000,
    Frequency.HOURLY: 40_000,
    Frequency.REAL_TIME: 1_000_000,
}

# Relative volatility of one step, per frequency.
_VOL: Mapping[Frequency, float] = {
    Frequency.DAILY: 0.02,
    Frequency.HOURLY: 0.004,
    Frequency.REAL_TIME: 0.0002,
}

_TIME_FORMATS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}"), "%Y-%m-%d"),
    (re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z"), "%Y-%m-%dT%H:%M:%SZ"),
    (
        re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z"),
        "%Y-%m-%dT%H:%M:%S.%fZ",
    ),
)


def to_ms(moment: datetime) -> int:
    """Unix milliseconds of an aware datetime (naive ones are taken as UTC)."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return _exact_ms(moment)


def _exact_ms(moment: datetime) -> int:
    delta = moment - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * MS_PER_DAY + delta.seconds * 1000 + delta.microseconds // 1000


def from_ms(ms: int) -> datetime:
    return datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)


def iso_ms(ms: int) -> str:
    """``2023-02-28T00:00:00.000Z`` for a Unix-millisecond timestamp."""
    moment = from_ms(ms)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def parse_time_param(text: str) -> int:
    """Parse ``start_time``/``end_time`` in one of the three documented formats to Unix ms.

    ``YYYY-MM-DD`` is midnight UTC. Anything else raises :class:`ValueError`.
    """
    for pattern, fmt in _TIME_FORMATS:
        if pattern.fullmatch(text):
            moment = datetime.strptime(text, fmt).replace(tzinfo=UTC)
            return _exact_ms(moment)
    raise ValueError(
        f"invalid time {text!r}: use YYYY-MM-DD, YYYY-MM-DDTHH:MM:SSZ or YYYY-MM-DDTHH:MM:SS.fffZ"
    )


class SimClock:
    """Simulated time: a start and a step per frequency, with one cursor per symbol.

    The first live record of a symbol is at ``start`` floored to its step (counted from the
    Unix epoch, so daily slots are midnight UTC); pre-built history lies before it. Each
    :meth:`tick` hands out the symbol's next slot and moves its cursor one step on.
    """

    def __init__(
        self,
        start: datetime | None = None,
        steps: Mapping[Frequency | str, timedelta] | None = None,
    ) -> None:
        moment = start if start is not None else datetime.now(UTC)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        self.start: datetime = moment.astimezone(UTC)
        self._steps: dict[Frequency, timedelta] = dict(DEFAULT_STEPS)
        for key, value in (steps or {}).items():
            if value <= timedelta(0) or value % timedelta(milliseconds=1):
                raise ValueError(f"step for {key!r} must be a positive whole number of ms")
            self._steps[Frequency(key)] = value
        self._next: dict[str, int] = {}

    def step(self, freq: Frequency | str) -> timedelta:
        return self._steps[Frequency(freq)]

    def step_ms(self, freq: Frequency | str) -> int:
        return self.step(freq) // timedelta(milliseconds=1)

    def origin_ms(self, freq: Frequency | str) -> int:
        """The first live slot of this frequency: ``start`` floored to the step."""
        step = self.step_ms(freq)
        return _exact_ms(self.start) // step * step

    def peek(self, symbol: str) -> int:
        """The slot (Unix ms) the symbol's next record will get."""
        found = self._next.get(symbol)
        return found if found is not None else self.origin_ms(Frequency.of(symbol))

    def tick(self, symbol: str) -> int:
        """Take the symbol's next slot and advance its cursor by one step."""
        slot = self.peek(symbol)
        self._next[symbol] = slot + self.step_ms(Frequency.of(symbol))
        return slot


class IdAllocator:
    """Official record ids, increasing per frequency (one source table per frequency)."""

    def __init__(self) -> None:
        self._next: dict[Frequency, int] = dict(_ID_BASE)

    def take(self, freq: Frequency) -> int:
        value = self._next[freq]
        self._next[freq] = value + 1
        return value


class Series:
    """The ordered history of one symbol: one record per timestamp, ascending."""

    def __init__(
        self, symbol: str, *, seed: int, clock: SimClock, ids: IdAllocator, jitter_ms: int = 0
    ) -> None:
        self.symbol = symbol
        self.freq = Frequency.of(symbol)
        self._seed = seed
        self._clock = clock
        self._ids = ids
        self.jitter_ms = jitter_ms
        if jitter_ms and jitter_ms >= clock.step_ms(self.freq):
            raise ValueError("jitter_ms must be shorter than the step: records stay in order")
        self._rng = random.Random(f"vinter:{seed}:{symbol}")
        self._level = 100.0 * (1 + self._rng.uniform(-0.05, 0.05))
        self.timestamps: list[int] = []
        self.records: list[Record] = []

    # -- generation ------------------------------------------------------------------------

    def prebuild(self, count: int) -> None:
        """Fill ``count`` official records in the slots just before the first live slot."""
        step = self._clock.step_ms(self.freq)
        origin = self._clock.origin_ms(self.freq)
        for k in range(count, 0, -1):
            self._store(self._make(origin - k * step, self._ids.take(self.freq)))

    def next_official(self, extra_bytes: int = 0) -> Record:
        """Generate the official record of the next slot (replacing an unofficial one there);
        a real-time record's timestamp lies up to `jitter_ms` after its slot. `extra_bytes`
        adds a field of that many random characters (an upstream field the client does not
        know, which it must keep; random, so that it does not compress)."""
        ts = self._clock.tick(self.symbol)
        if self.jitter_ms and self.freq is Frequency.REAL_TIME:
            ts += self._rng.randrange(self.jitter_ms)
        record = self._make(ts, self._ids.take(self.freq))
        if extra_bytes:
            record["note"] = base64.b64encode(self._rng.randbytes(extra_bytes * 3 // 4)).decode()
        return self._store(record)

    def unofficial(self, at_ms: int | None, fields: Mapping[str, int | float | str]) -> Record:
        """Store an ``id == 0`` record at ``at_ms`` (default: the next slot, not consumed)."""
        ts = self._clock.peek(self.symbol) if at_ms is None else at_ms
        index = self._index_of(ts)
        if index is not None and self.records[index]["id"] != 0:
            raise ValueError(f"{self.symbol}: an official record already exists at {iso_ms(ts)}")
        rng = random.Random(f"vinter:{self._seed}:{self.symbol}:unofficial:{ts}")
        record = self._make(ts, 0, rng=rng, advance=False)
        record.update(fields)
        record["id"] = 0
        return self._store(record)

    def correct(self, day: date, close: float, updated_at: datetime | None) -> Record:
        """Change a daily record's close (widening high/low) and move ``updated_at`` later."""
        if self.freq is not Frequency.DAILY:
            raise ValueError(f"{self.symbol}: only daily records are corrected upstream")
        wanted = day.isoformat()
        for index in range(len(self.records) - 1, -1, -1):
            old = self.records[index]
            if old["date"] == wanted:
                break
        else:
            raise KeyError(f"{self.symbol}: no record dated {wanted}")
        new = dict(old)
        new["close"] = close
        new["high"] = max(float(old["high"]), close)
        new["low"] = min(float(old["low"]), close)
        previous = parse_time_param(str(old["updated_at"]))
        if updated_at is None:
            stamp = max(_exact_ms(datetime.now(UTC)), previous + 1)
        else:
            stamp = to_ms(updated_at)
            if stamp <= previous:
                raise ValueError("updated_at of a correction must be later than the previous one")
        new["updated_at"] = iso_ms(stamp)
        self.records[index] = new
        return new

    def _make(
        self, ts: int, record_id: int, *, rng: random.Random | None = None, advance: bool = True
    ) -> Record:
        draw = rng or self._rng
        vol = _VOL[self.freq]
        day = from_ms(ts)
        head: Record = {
            "id": record_id,
            "symbol": self.symbol,
            "created_at": iso_ms(ts),
        }
        if self.freq is Frequency.REAL_TIME:
            value = self._level * (1 + draw.gauss(0.0, vol))
            if advance:
                self._level = value
            return head | {"value": round(value, 4), "timestamp": ts, "date": f"{day:%Y-%m-%d}"}
        open_ = self._level * (1 + draw.gauss(0.0, vol / 4))
        close = open_ * (1 + draw.gauss(0.0, vol))
        high = max(open_, close) * (1 + abs(draw.gauss(0.0, vol / 2)))
        low = min(open_, close) * (1 - abs(draw.gauss(0.0, vol / 2)))
        if advance:
            self._level = close
        record = head | {
            "open": round(open_, 2),
            "low": round(low, 2),
            "high": round(high, 2),
            "close": round(close, 2),
            "timestamp": ts,
            "date": f"{day:%Y-%m-%d}",
        }
        if self.freq is Frequency.DAILY:
            record["updated_at"] = iso_ms(ts)
        else:
            record["hour"] = day.hour
        return record

    # -- storage and queries ---------------------------------------------------------------

    def _index_of(self, ts: int) -> int | None:
        index = bisect.bisect_left(self.timestamps, ts)
        if index < len(self.timestamps) and self.timestamps[index] == ts:
            return index
        return None

    def _store(self, record: Record) -> Record:
        ts = int(record["timestamp"])
        index = self._index_of(ts)
        if index is not None:
            self.records[index] = record
        else:
            index = bisect.bisect_left(self.timestamps, ts)
            self.timestamps.insert(index, ts)
            self.records.insert(index, record)
        return record

    def select(self, start_ms: int | None, end_ms: int | None) -> list[Record]:
        """Records with ``start_ms <= timestamp < end_ms`` (either bound optional), ascending."""
        lo = 0 if start_ms is None else bisect.bisect_left(self.timestamps, start_ms)
        hi = len(self.timestamps) if end_ms is None else bisect.bisect_left(self.timestamps, end_ms)
        return self.records[lo : max(lo, hi)]
