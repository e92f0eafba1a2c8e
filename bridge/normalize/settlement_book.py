"""Which revision of each official daily close to publish: per symbol, a `Checkpoint` of
the recent dates' `updated_at`, revision and digest of what was published. Pure: `plan`
turns one poll's records into a `Plan` (events, refusals, the new checkpoint), and `apply`
moves the book on once the caller has committed it (why: docs/design.md, "Settlements")."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from bridge.errors import BadRecord
from bridge.events import Event
from bridge.normalize.settlement import (
    DATE_PATTERN,
    MS_PER_DAY,
    NUMBERS,
    STRINGS,
    Daily,
    is_official,
    midnight_ms,
    parse_daily,
    settlement_of,
)

LOOKBACK_DAYS = 7
"""Days before the newest settled date that are fetched again on every poll, so upstream
corrections of recent closes are seen. Corrections of older closes are not looked for."""
REFUSED_CAP = 256
CHECKPOINT_VERSION = 1


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
            not DATE_PATTERN.fullmatch(day)
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
            return midnight_ms(today - timedelta(days=backfill_days))
        return midnight_ms(date.fromisoformat(horizon)) - MS_PER_DAY

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


def _shift(day: str, days: int) -> str:
    return (date.fromisoformat(day) + timedelta(days=days)).isoformat()


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
