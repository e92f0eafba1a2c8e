"""Settlement logic, pure: normalization, revisions, checkpoints, the poll schedule, and a
model of polls and crashes checked against the exactly-once invariants."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bridge.config import SettlementSettings
from bridge.errors import BadRecord
from bridge.normalize.settlement import SOURCE, parse_daily, settlement_event
from bridge.normalize.settlement_book import (
    Checkpoint,
    Plan,
    Settled,
    SettlementBook,
    checkpoint_key,
)
from bridge.sources.settlement import next_poll_in
from tests.samples import DAILY

SYMBOL = DAILY["symbol"]
MS_PER_DAY = 86_400_000


def daily(
    day: str, *, close: float = 100.0, updated: str | None = None, **over: Any
) -> dict[str, Any]:
    """A daily record of SYMBOL for `day`, shaped like the vendor sample."""
    ts = (date.fromisoformat(day) - date(1970, 1, 1)).days * MS_PER_DAY
    stamp = f"{day}T00:00:00.000Z"
    record = {
        **DAILY,
        "id": 1000 + (date.fromisoformat(day) - date(2023, 1, 1)).days,
        "date": day,
        "timestamp": ts,
        "created_at": stamp,
        "updated_at": updated or stamp,
        "close": close,
        "high": max(close, 101.0),
        "low": min(close, 97.0),
    }
    record.update(over)
    return record


def days(n: int, first: str = "2023-03-01") -> list[str]:
    start = date.fromisoformat(first)
    return [(start + timedelta(days=i)).isoformat() for i in range(n)]


# -- normalization ---------------------------------------------------------------------------


def test_every_field_of_the_vendor_sample_is_mapped() -> None:
    event = settlement_event({**DAILY, "weight": 0.5}, revision=1)
    assert event.validation_error() is None
    assert event.type == "vinter.nav.settlement"
    assert event.id == "settlement:vnfa-btca-15-d:2023-02-28:1"
    assert event.key == SYMBOL
    assert event.source == SOURCE == "/vinter/nav/rest"
    assert event.time == "2023-02-28T00:00:00.000Z"
    assert event.data == {
        "symbol": SYMBOL,
        "date": "2023-02-28",
        "revision": 1,
        "supersedes": None,
        "close": 98.63,
        "open": 99.45,
        "high": 100.04,
        "low": 98.23,
        "upstream_id": 2068,
        "timestamp": 1677542400000,
        "created_at": "2023-02-28T00:00:00.000Z",
        "updated_at": "2023-02-28T00:00:00.000Z",
        "extra": {"weight": 0.5},
    }
    assert "extra" not in settlement_event(DAILY, revision=1).data
    second = settlement_event(DAILY, revision=2, supersedes=1)
    assert (second.id, second.data["supersedes"]) == (
        "settlement:vnfa-btca-15-d:2023-02-28:2",
        1,
    )


@pytest.mark.parametrize("upstream_id", [0, 0.0, None])
def test_an_unofficial_record_is_never_a_settlement(upstream_id: Any) -> None:
    record = {**DAILY, "id": upstream_id}
    with pytest.raises(BadRecord, match="not_official"):
        settlement_event(record, revision=1)
    without_id = {k: v for k, v in DAILY.items() if k != "id"}
    with pytest.raises(BadRecord, match="not_official"):
        settlement_event(without_id, revision=1)
    plan = SettlementBook().plan(SYMBOL, [record, without_id])
    assert plan.events == ()
    assert plan.refused == ()


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ([1], "not_an_object"),
        ({**DAILY, "symbol": "vnfa-btca-15-h"}, "symbol_mismatch"),
        ({**DAILY, "id": -3}, "bad_field"),
        ({**DAILY, "id": "2068"}, "bad_field"),
        ({**DAILY, "date": "28/02/2023"}, "bad_field"),
        ({**DAILY, "date": "2023-02-30"}, "bad_field"),
        ({**DAILY, "date": "2023-02-28\n"}, "bad_field"),
        ({k: v for k, v in DAILY.items() if k != "date"}, "missing_field"),
        ({k: v for k, v in DAILY.items() if k != "close"}, "missing_field"),
        ({**DAILY, "close": "98.6"}, "bad_field"),
        ({**DAILY, "close": float("nan")}, "bad_field"),
        ({**DAILY, "timestamp": 1677542400}, "bad_field"),
        ({**DAILY, "updated_at": 5}, "bad_field"),
    ],
)
def test_bad_records_name_a_reason(record: Any, reason: str) -> None:
    with pytest.raises(BadRecord) as info:
        parse_daily(record, expected_symbol=SYMBOL)
    assert info.value.reason == reason


def test_revision_rules_are_checked() -> None:
    with pytest.raises(BadRecord, match="bad_revision"):
        settlement_event(DAILY, revision=2)
    with pytest.raises(BadRecord, match="bad_revision"):
        settlement_event(DAILY, revision=1, supersedes=1)


# -- the book --------------------------------------------------------------------------------


def publish(book: SettlementBook, records: list[dict[str, Any]]) -> Plan:
    plan = book.plan(SYMBOL, records)
    book.apply([plan])
    return plan


def test_new_dates_are_revision_one_in_date_order() -> None:
    book = SettlementBook()
    records = [daily(d, close=100 + i) for i, d in enumerate(days(5))]
    plan = publish(book, records)
    assert [e.data["date"] for e in plan.events] == days(5)
    assert {e.data["revision"] for e in plan.events} == {1}
    assert all(e.data["supersedes"] is None for e in plan.events)
    assert plan.checkpoint.last_date == days(5)[-1]


def test_unchanged_records_publish_nothing() -> None:
    book = SettlementBook()
    records = [daily(d) for d in days(3)]
    publish(book, records)
    again = book.plan(SYMBOL, records)
    assert again.events == ()
    assert not again.changed
    assert again.checkpoint == book.get(SYMBOL)


def test_a_correction_is_the_next_revision_and_nothing_else() -> None:
    book = SettlementBook()
    first = [daily(d) for d in days(3)]
    publish(book, first)
    corrected = [*first[:2], daily(days(3)[2], close=95.5, updated="2023-03-04T09:00:00.000Z")]
    plan = publish(book, corrected)
    assert [(e.data["date"], e.data["revision"], e.data["supersedes"]) for e in plan.events] == [
        (days(3)[2], 2, 1)
    ]
    assert plan.events[0].id == f"settlement:{SYMBOL}:{days(3)[2]}:2"
    assert plan.events[0].data["close"] == 95.5
    assert book.plan(SYMBOL, corrected).events == ()
    third = [*first[:2], daily(days(3)[2], close=96.0, updated="2023-03-05T09:00:00.000Z")]
    assert [(e.data["revision"], e.data["supersedes"]) for e in publish(book, third).events] == [
        (3, 2)
    ]


def test_changed_values_with_the_same_updated_at_are_a_revision() -> None:
    book = SettlementBook()
    publish(book, [daily("2023-03-01")])
    plan = publish(book, [daily("2023-03-01", high=150.0)])
    assert [e.data["revision"] for e in plan.events] == [2]


def test_a_stale_read_does_not_go_back() -> None:
    book = SettlementBook()
    publish(book, [daily("2023-03-01", close=90.0, updated="2023-03-02T00:00:00.000Z")])
    stale = daily("2023-03-01", close=80.0, updated="2023-03-01T00:00:00.000Z")
    assert book.plan(SYMBOL, [stale]).events == ()


def test_two_records_for_one_date_the_later_update_wins() -> None:
    book = SettlementBook()
    older = daily("2023-03-01", close=90.0, updated="2023-03-01T00:00:00.000Z")
    newer = daily("2023-03-01", close=91.0, updated="2023-03-02T00:00:00.000Z")
    plan = publish(book, [newer, older])
    assert [(e.data["revision"], e.data["close"]) for e in plan.events] == [(1, 91.0)]
    assert book.plan(SYMBOL, [newer, older]).events == ()


def test_bad_records_are_refused_once() -> None:
    book = SettlementBook()
    bad = {**daily("2023-03-02"), "close": "n/a"}
    plan = publish(book, [daily("2023-03-01"), bad])
    assert len(plan.events) == 1
    assert [(r.reason, orjson.loads(r.raw)["close"]) for r in plan.refused] == [
        ("bad_field", "n/a")
    ]
    again = book.plan(SYMBOL, [daily("2023-03-01"), bad])
    assert not again.changed


def test_old_dates_are_pruned_and_ignored_after_the_horizon() -> None:
    book = SettlementBook(lookback_days=3)
    records = [daily(d) for d in days(10)]
    plan = publish(book, records)
    assert len(plan.events) == 10
    assert sorted(plan.checkpoint.settled) == days(10)[-4:]
    # A correction of a pruned date is outside the look-back: not published again.
    corrected = [daily(days(10)[0], close=1.0, updated="2023-04-01T00:00:00.000Z"), *records[1:]]
    assert book.plan(SYMBOL, corrected).events == ()


def test_fetch_window() -> None:
    book = SettlementBook(lookback_days=3)
    now = datetime(2023, 3, 31, 12, tzinfo=UTC)
    now_ms = int(now.timestamp() * 1000)
    first = book.fetch_start(SYMBOL, now_ms, backfill_days=30)
    assert first == int(datetime(2023, 3, 1, tzinfo=UTC).timestamp() * 1000)
    publish(book, [daily(d) for d in days(30)])  # up to 2023-03-30
    later = book.fetch_start(SYMBOL, now_ms, backfill_days=30)
    assert later == int(datetime(2023, 3, 26, tzinfo=UTC).timestamp() * 1000)


def test_checkpoint_round_trip() -> None:
    checkpoint = Checkpoint(
        SYMBOL,
        {
            "2023-03-01": Settled("2023-03-01T00:00:00.000Z", 2, "abc"),
            "2023-03-02": Settled(None, 1, "d"),
        },
        ("f1", "f2"),
    )
    raw = checkpoint.to_bytes()
    assert Checkpoint.from_bytes(raw, symbol=SYMBOL) == checkpoint
    assert orjson.loads(raw)["settled"]["2023-03-01"] == ["2023-03-01T00:00:00.000Z", 2, "abc"]
    assert checkpoint_key(SYMBOL) == "settlement:vnfa-btca-15-d"
    book = SettlementBook()
    plan = publish(book, [daily(d) for d in days(3)])
    assert Checkpoint.from_bytes(plan.checkpoint.to_bytes()) == plan.checkpoint


@pytest.mark.parametrize(
    "raw",
    [
        b"{",
        b"[]",
        b'{"v": 2, "symbol": "vnfa-btca-15-d", "settled": {}}',
        b'{"v": 1, "symbol": "other-d", "settled": {}}',
        b'{"v": 1, "symbol": "vnfa-btca-15-d", "settled": {"2023-03-01": [null, 0, "x"]}}',
        b'{"v": 1, "symbol": "vnfa-btca-15-d", "settled": {"x": [null, 1, "x"]}}',
        b'{"v": 1, "symbol": "vnfa-btca-15-d", "settled": {}, "refused": [1]}',
    ],
)
def test_a_bad_checkpoint_is_refused(raw: bytes) -> None:
    with pytest.raises(BadRecord, match="bad_checkpoint"):
        Checkpoint.from_bytes(raw, symbol=SYMBOL)


# -- schedule --------------------------------------------------------------------------------


def at(hh: int, mm: int, ss: int = 0) -> datetime:
    return datetime(2024, 5, 6, hh, mm, ss, tzinfo=UTC)


def test_schedule_inside_and_outside_the_window() -> None:
    config = SettlementSettings(
        window_start="15:00", window_end="19:00", interval_s=900, window_interval_s=60
    )
    assert next_poll_in(at(16, 0), config) == 60
    assert next_poll_in(at(15, 0), config) == 60
    assert next_poll_in(at(19, 0), config) == 900
    assert next_poll_in(at(3, 0), config) == 900
    assert next_poll_in(at(14, 55), config) == 300  # the first window poll falls on its start


def test_schedule_window_past_midnight_and_empty_window() -> None:
    wrap = SettlementSettings(window_start="23:00", window_end="01:00", interval_s=900)
    assert next_poll_in(at(23, 30), wrap) == wrap.window_interval_s
    assert next_poll_in(at(0, 30), wrap) == wrap.window_interval_s
    assert next_poll_in(at(22, 59, 30), wrap) == 30
    none = SettlementSettings(window_start="10:00", window_end="10:00", interval_s=123)
    assert next_poll_in(at(10, 0), none) == 123


# -- model: polls, corrections, unofficial values and crashes --------------------------------

MODEL_SYMBOLS = ("aa-d", "bb-d")
FIRST_DAY = date(2024, 1, 1)
LOOKBACK = 3


class SettlementModel(RuleBasedStateMachine):
    """Upstream, a poller with an in-memory book, and a committed log (what Kafka holds).

    A poll publishes its events and checkpoints into the log in one step (the transaction);
    a crash drops the in-memory book and reloads it from the newest committed checkpoints.
    """

    @initialize()
    def setup(self) -> None:
        self.upstream: dict[str, dict[str, dict[str, Any]]] = {s: {} for s in MODEL_SYMBOLS}
        self.next_day = dict.fromkeys(MODEL_SYMBOLS, 0)
        self.next_id = 1000
        self.clock_ms = 0
        self.log: list[dict[str, Any]] = []  # committed events, in commit order
        self.checkpoints: dict[str, list[bytes]] = {s: [] for s in MODEL_SYMBOLS}
        self.book = SettlementBook(lookback_days=LOOKBACK)
        self.polled_clean = False

    # -- upstream --------------------------------------------------------------------------

    def _stamp(self) -> str:
        self.clock_ms += 1
        moment = datetime(2024, 6, 1, tzinfo=UTC) + timedelta(milliseconds=self.clock_ms)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")

    @rule(symbol=st.sampled_from(MODEL_SYMBOLS), close=st.floats(50, 150))
    def add_day(self, symbol: str, close: float) -> None:
        day = (FIRST_DAY + timedelta(days=self.next_day[symbol])).isoformat()
        self.next_day[symbol] += 1
        self.next_id += 1
        stamp = self._stamp()
        self.upstream[symbol][day] = {
            "id": self.next_id,
            "symbol": symbol,
            "date": day,
            "timestamp": (date.fromisoformat(day) - date(1970, 1, 1)).days * MS_PER_DAY,
            "created_at": stamp,
            "updated_at": stamp,
            "open": 100.0,
            "high": max(close, 100.0),
            "low": min(close, 100.0),
            "close": round(close, 2),
        }
        self.polled_clean = False

    @precondition(lambda self: any(self.upstream[s] for s in MODEL_SYMBOLS))
    @rule(data=st.data(), close=st.floats(50, 150))
    def correct_day(self, data: st.DataObject, close: float) -> None:
        symbol = data.draw(st.sampled_from([s for s in MODEL_SYMBOLS if self.upstream[s]]))
        day = data.draw(st.sampled_from(sorted(self.upstream[symbol])))
        record = self.upstream[symbol][day]
        if record["id"] == 0:
            return
        close = round(close, 2)
        record.update(
            close=close,
            high=max(record["high"], close),
            low=min(record["low"], close),
            updated_at=self._stamp(),
        )
        self.polled_clean = False

    @rule(symbol=st.sampled_from(MODEL_SYMBOLS), close=st.floats(50, 150))
    def add_unofficial(self, symbol: str, close: float) -> None:
        """An id == 0 value in the next day's slot; a later add_day replaces it."""
        day = (FIRST_DAY + timedelta(days=self.next_day[symbol])).isoformat()
        self.upstream[symbol][day] = {
            "id": 0,
            "symbol": symbol,
            "date": day,
            "timestamp": (date.fromisoformat(day) - date(1970, 1, 1)).days * MS_PER_DAY,
            "updated_at": self._stamp(),
            "close": round(close, 2),
        }
        self.polled_clean = False

    # -- the poller ------------------------------------------------------------------------

    def _plans(self) -> list[Plan]:
        now_ms = (
            (FIRST_DAY - date(1970, 1, 1)).days + max(self.next_day.values()) + 1
        ) * MS_PER_DAY
        plans = []
        for symbol in MODEL_SYMBOLS:
            start = self.book.fetch_start(symbol, now_ms, backfill_days=10_000)
            records = sorted(
                (r for r in self.upstream[symbol].values() if start <= r["timestamp"] < now_ms),
                key=lambda r: r["timestamp"],
            )
            plan = self.book.plan(symbol, records)
            if plan.changed:
                plans.append(plan)
        return plans

    def _commit(self, plans: list[Plan]) -> None:
        """The transaction: all events and checkpoints of the poll, or nothing."""
        for plan in plans:
            self.log.extend(orjson.loads(e.to_json()) for e in plan.events)
            self.checkpoints[plan.symbol].append(plan.checkpoint.to_bytes())

    @rule()
    def poll(self) -> None:
        plans = self._plans()
        self._commit(plans)
        self.book.apply(plans)
        self.polled_clean = True

    @rule()
    def crash_before_commit(self) -> None:
        self._plans()  # computed, never committed: the transaction is aborted
        self.crash()

    @rule()
    def crash_after_commit(self) -> None:
        self._commit(self._plans())  # committed, but the book never moved on
        self.crash()

    @rule()
    def crash(self) -> None:
        stored = [Checkpoint.from_bytes(log[-1]) for log in self.checkpoints.values() if log]
        self.book = SettlementBook(stored, lookback_days=LOOKBACK)
        self.polled_clean = False

    # -- invariants ------------------------------------------------------------------------

    def _revisions(self) -> dict[tuple[str, str], list[dict[str, Any]]]:
        found: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for event in self.log:
            found.setdefault((event["data"]["symbol"], event["data"]["date"]), []).append(event)
        return found

    @invariant()
    def exactly_once(self) -> None:
        ids = [e["id"] for e in self.log]
        assert len(ids) == len(set(ids))
        keys = [(e["data"]["symbol"], e["data"]["date"], e["data"]["revision"]) for e in self.log]
        assert len(keys) == len(set(keys))

    @invariant()
    def revisions_are_consecutive(self) -> None:
        for events in self._revisions().values():
            assert [e["data"]["revision"] for e in events] == list(range(1, len(events) + 1))
            expected = [None, *range(1, len(events))]
            assert [e["data"]["supersedes"] for e in events] == expected
            assert all(e["data"]["upstream_id"] != 0 for e in events)

    @invariant()
    def checkpoint_never_ahead(self) -> None:
        revisions = self._revisions()
        for symbol, stored in self.checkpoints.items():
            if not stored:
                assert self.book.get(symbol) is None
                continue
            checkpoint = Checkpoint.from_bytes(stored[-1], symbol=symbol)
            for day, settled in checkpoint.settled.items():
                events = revisions.get((symbol, day), [])
                assert settled.revision == len(events), (symbol, day)
            # the in-memory book is the committed checkpoint, never ahead of it
            assert self.book.get(symbol) == checkpoint

    @invariant()
    def settled_values_follow_upstream(self) -> None:
        if not self.polled_clean:
            return
        revisions = self._revisions()
        for symbol, records in self.upstream.items():
            checkpoint = self.book.get(symbol)
            horizon = checkpoint.horizon(LOOKBACK) if checkpoint else None
            for day, record in records.items():
                events = revisions.get((symbol, day), [])
                if record["id"] == 0:
                    assert events == []  # an unofficial slot was never settled
                    continue
                assert events, (symbol, day)
                if horizon is None or day >= horizon:
                    last = events[-1]["data"]
                    assert (last["close"], last["high"], last["low"], last["updated_at"]) == (
                        record["close"],
                        record["high"],
                        record["low"],
                        record["updated_at"],
                    )


SettlementModel.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_settlement_model = SettlementModel.TestCase
