"""Official daily closes -> `vinter.nav.settlement` events, and the checkpoint logic that
decides which revision to publish. Pure: no I/O and no clock; raises BadRecord, nothing else.

A daily record is a settlement only when it is official (`id` present and not 0). The first
official record of a date is revision 1; when upstream later changes that date's record (a
later `updated_at`, or other close/open/high/low values), the next revision is published
and names the one it supersedes. A record that has not changed publishes nothing.

`SettlementBook` keeps, per symbol, a `Checkpoint`: for each recent date the `updated_at`,
revision and a digest of the values last published. `SettlementBook.plan` turns the records
of one poll into a `Plan` (events, refused records, the new checkpoint) without changing
the book; `SettlementBook.apply` moves the book on once the caller has committed the plan.

The checkpoint keeps only dates from `lookback_days` before the newest settled date on
(the *horizon*); older records are neither fetched again nor considered, so a pruned date
can never be mistaken for a new one. A record refused as bad input is remembered by a
fingerprint (the last `REFUSED_CAP` of them), so it is dead-lettered once, not every poll.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from bridge.errors import BadRecord
from bridge.events import SETTLEMENT, Event
from bridge.normalize.nav import MAX_INT, MAX_MS, MIN_INT, MIN_MS, SOURCE_REST
from bridge.timefmt import iso_from_ms

SOURCE = SOURCE_REST
LOOKBACK_DAYS = 7
"""Days before the newest settled date that are fetched again on every poll, so upstream
corrections of recent closes are seen. Corrections of older closes are not looked for."""
REFUSED_CAP = 256
CHECKPOINT_VERSION = 1
MS_PER_DAY = 86_400_000
_EPOCH = date(1970, 1, 1)

NUMBERS = ("open", "high", "low", "close")
STRINGS = ("created_at", "updated_at")
MAPPED = frozenset(("id", "symbol", "date", "timestamp", *NUMBERS, *STRINGS))
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


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
    calendar_day = _parse_date(day) if _DATE.fullmatch(day) else None
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


def checkpoint_key(symbol: str) -> str:
    """Key of a symbol's checkpoint in the compacted state topic."""
    return f"settlement:{symbol}"


@dataclass(frozen=True, slots=True)
class Settled:
    """What was last published for one date."""

    updated_at: str | None
    revision: int
    digest: str


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """What one symbol has settled: date -> `Settled`, plus refused-record fingerprints."""

    symbol: str
    settled: Mapping[str, Settled] = field(default_factory=dict)
    refused: tuple[str, ...] = ()

    @property
    def last_date(self) -> str | None:
        return max(self.settled) if self.settled else None

    def horizon(self, lookback_days: int) -> str | None:
        """The oldest date still tracked: `lookback_days` before the newest settled one."""
        last = self.last_date
        return None if last is None else _shift(last, -lookback_days)

    def to_bytes(self) -> bytes:
        return orjson.dumps(
            {
                "v": CHECKPOINT_VERSION,
                "symbol": self.symbol,
                "settled": {
                    day: [s.updated_at, s.revision, s.digest]
                    for day, s in sorted(self.settled.items())
                },
                "refused": list(self.refused),
            }
        )

    @classmethod
    def from_bytes(cls, raw: bytes, *, symbol: str | None = None) -> Checkpoint:
        """Read a stored checkpoint; BadRecord("bad_checkpoint") if it is not one."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRecord("bad_checkpoint", f"not JSON: {exc}", raw=raw) from None
        problem = _checkpoint_problem(doc, symbol)
        if problem:
            raise BadRecord("bad_checkpoint", problem, raw=raw)
        settled = {
            str(day): Settled(entry[0], int(entry[1]), str(entry[2]))
            for day, entry in doc["settled"].items()
        }
        return cls(str(doc["symbol"]), settled, tuple(doc.get("refused", ())))


def _checkpoint_problem(doc: Any, symbol: str | None) -> str:
    if not isinstance(doc, dict) or doc.get("v") != CHECKPOINT_VERSION:
        return f"not a version {CHECKPOINT_VERSION} checkpoint"
    if not isinstance(doc.get("symbol"), str) or (symbol is not None and doc["symbol"] != symbol):
        return f"symbol is {doc.get('symbol')!r}, expected {symbol!r}"
    settled = doc.get("settled")
    if not isinstance(settled, dict):
        return "settled is not an object"
    for day, entry in settled.items():
        if (
            not _DATE.fullmatch(day)
            or not isinstance(entry, list)
            or len(entry) != 3
            or not (entry[0] is None or isinstance(entry[0], str))
            or not isinstance(entry[1], int)
            or isinstance(entry[1], bool)
            or entry[1] < 1
            or not isinstance(entry[2], str)
        ):
            return f"settled[{day[:32]!r}] is not [updated_at, revision, digest]"
    refused = doc.get("refused", [])
    if not isinstance(refused, list) or not all(isinstance(f, str) for f in refused):
        return "refused is not a list of strings"
    return ""


# -- the book --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Refusal:
    """An upstream record that cannot be a settlement: dead-letter `raw` with `reason`."""

    raw: bytes
    reason: str
    detail: str
    fingerprint: str


@dataclass(frozen=True, slots=True)
class Plan:
    """What one poll of one symbol publishes, and the checkpoint that goes with it."""

    symbol: str
    events: tuple[Event, ...]
    refused: tuple[Refusal, ...]
    checkpoint: Checkpoint

    @property
    def changed(self) -> bool:
        return bool(self.events or self.refused)


class SettlementBook:
    """The checkpoints of every symbol, and the rules that turn a poll into revisions."""

    def __init__(
        self,
        checkpoints: Iterable[Checkpoint] = (),
        *,
        lookback_days: int = LOOKBACK_DAYS,
        max_record_bytes: int | None = None,
    ) -> None:
        if lookback_days < 0:
            raise ValueError("lookback_days must be >= 0")
        self.lookback_days = lookback_days
        self.max_record_bytes = max_record_bytes
        self._checkpoints: dict[str, Checkpoint] = {cp.symbol: cp for cp in checkpoints}

    def get(self, symbol: str) -> Checkpoint | None:
        return self._checkpoints.get(symbol)

    def __len__(self) -> int:
        return len(self._checkpoints)

    def fetch_start(self, symbol: str, now_ms: int, backfill_days: int) -> int:
        """Where one poll of `symbol` starts (Unix ms, inclusive).

        First start (nothing settled yet): midnight UTC `backfill_days` before today. Then:
        the day before the horizon (a record's timestamp may fall before its `date`); the
        plan ignores what lies before the horizon itself.
        """
        checkpoint = self._checkpoints.get(symbol)
        horizon = None if checkpoint is None else checkpoint.horizon(self.lookback_days)
        if horizon is None:
            today = datetime.fromtimestamp(now_ms / 1000, tz=UTC).date()
            return _midnight_ms(today - timedelta(days=backfill_days))
        return _midnight_ms(date.fromisoformat(horizon)) - MS_PER_DAY

    def plan(self, symbol: str, records: Sequence[Any]) -> Plan:
        """Decide what the records of one poll (sorted by timestamp) publish.

        Does not change the book: call `apply` once the plan is committed.
        """
        current = self._checkpoints.get(symbol) or Checkpoint(symbol)
        horizon = current.horizon(self.lookback_days)
        refused_before = set(current.refused)
        refusals: list[Refusal] = []
        newest: dict[str, Daily] = {}
        for record in records:
            if not is_official(record):
                continue  # id == 0: an indicative value, never a settlement
            try:
                daily = parse_daily(record, expected_symbol=symbol)
            except BadRecord as exc:
                _refuse(refusals, refused_before, record, exc)
                continue
            if horizon is not None and daily.date < horizon:
                continue  # pruned from the checkpoint: settled long ago
            seen = newest.get(daily.date)
            # Two official records for one date: the later update wins (ties: the later one).
            if seen is None or not _is_older(daily.updated_at, seen.updated_at):
                newest[daily.date] = daily

        settled = dict(current.settled)
        events: list[Event] = []
        for day in sorted(newest):
            daily = newest[day]
            before = settled.get(day)
            digest = daily.digest()
            if before is None:
                revision, supersedes = 1, None
            elif before.updated_at == daily.updated_at and before.digest == digest:
                continue  # unchanged
            elif _is_older(daily.updated_at, before.updated_at):
                continue  # a stale read of a record already superseded
            else:
                revision, supersedes = before.revision + 1, before.revision
            try:
                event = settlement_of(daily, revision=revision, supersedes=supersedes)
                self._check_size(event)
            except BadRecord as exc:
                _refuse(refusals, refused_before, _raw_dict(daily), exc)
                continue
            events.append(event)
            settled[day] = Settled(daily.updated_at, revision, digest)

        if settled:
            new_horizon = _shift(max(settled), -self.lookback_days)
            settled = {day: s for day, s in settled.items() if day >= new_horizon}
        refused = (*current.refused, *(r.fingerprint for r in refusals))[-REFUSED_CAP:]
        checkpoint = Checkpoint(symbol, settled, tuple(refused))
        return Plan(symbol, tuple(events), tuple(refusals), checkpoint)

    def _check_size(self, event: Event) -> None:
        """BadRecord("too_large") for an event Kafka would refuse (over the record limit)."""
        limit = self.max_record_bytes
        if limit is not None and len(size := event.to_json()) > limit:
            raise BadRecord(
                "too_large",
                f"a {len(size)}-byte settlement, over kafka.max_record_bytes ({limit})",
            )

    def apply(self, plans: Iterable[Plan]) -> None:
        """Move the book on to the checkpoints of committed plans."""
        for plan in plans:
            self._checkpoints[plan.symbol] = plan.checkpoint


def _refuse(refusals: list[Refusal], known: set[str], record: Any, exc: BadRecord) -> None:
    raw = _raw_bytes(record)
    fingerprint = hashlib.sha256(raw).hexdigest()[:16]
    if fingerprint in known:
        return  # dead-lettered by an earlier poll
    known.add(fingerprint)
    refusals.append(Refusal(raw, exc.reason, exc.detail, fingerprint))


def _raw_bytes(record: Any) -> bytes:
    try:
        return orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
    except TypeError:  # orjson.JSONEncodeError: e.g. an integer past 64 bits
        return repr(record).encode()


def _raw_dict(daily: Daily) -> dict[str, Any]:
    return {
        **daily.extra,
        "id": daily.upstream_id,
        "symbol": daily.symbol,
        "date": daily.date,
        "timestamp": daily.timestamp,
        **{name: getattr(daily, name) for name in (*NUMBERS, *STRINGS)},
    }


def _parse_date(text: str) -> date | None:
    try:
        return date.fromisoformat(text)
    except ValueError:
        return None


def _shift(day: str, days: int) -> str:
    return (date.fromisoformat(day) + timedelta(days=days)).isoformat()


def _midnight_ms(day: date) -> int:
    return (day - date(1970, 1, 1)).days * MS_PER_DAY


def _instant(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _is_older(candidate: str | None, reference: str | None) -> bool:
    """True only when both parse as times and `candidate` is strictly earlier."""
    a, b = _instant(candidate), _instant(reference)
    return a is not None and b is not None and a < b
