"""The freshness board: one row per configured subscription, its state from its source's,
exported as gauges whose label sets never grow with upstream data."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry

from bridge.freshness import STATES, Board, Row, state_of
from bridge.supervisor import SourceState
from tests.tooling import scrape


def test_a_row_says_when_it_published_and_how_late_its_record_was() -> None:
    row = Row("nav", "vnfa-btca-15-r", "vinter.nav:vnfa-btca-15-r", 60.0)
    before = time.time()
    row.published(before - 2.5)
    assert row.published_at is not None
    assert before <= row.published_at <= time.time()
    assert row.lag_s is not None
    assert 2.5 <= row.lag_s < 3.5
    row.published(time.time() + 30)  # an upstream clock ahead of ours is no negative lag
    assert row.lag_s == 0.0


def test_the_state_comes_from_the_source_held_here() -> None:
    row = Row("vwap", "cbse:spot:btc-usd:1s", "kaiko.vwap:cbse:spot:btc-usd:1s", 30.0)
    assert state_of(row, {}) == "elsewhere"
    state = SourceState(row.source)
    assert state_of(row, {row.source: state}) == "down"
    state.connected = True
    assert state_of(row, {row.source: state}) == "connected"
    row.backfilling = True
    assert state_of(row, {row.source: state}) == "backfilling"
    state.parked = True
    assert state_of(row, {row.source: state}) == "parked"


def test_the_board_exports_every_row_and_one_state_each() -> None:
    registry = CollectorRegistry()
    board = Board(registry)
    held = board.row("nav", "vnfa-btca-15-r", source="vinter.nav:vnfa-btca-15-r", stale_after_s=60)
    board.row("settlement", "vnfa-btca-15-d", source="settlement@3", stale_after_s=93600)
    assert board.row("nav", "vnfa-btca-15-r", source="other", stale_after_s=1) is held
    connected = SourceState(held.source, connected=True)
    board.watch(lambda: {connected.name: connected})
    held.published(time.time() - 1)

    samples = scrape(registry)
    nav = (("feed", "nav"), ("subscription", "vnfa-btca-15-r"))
    daily = (("feed", "settlement"), ("subscription", "vnfa-btca-15-d"))
    assert samples[("bridge_subscription_stale_after_seconds", nav)] == 60
    assert samples[("bridge_subscription_stale_after_seconds", daily)] == 93600
    assert samples[("bridge_subscription_last_published_timestamp_seconds", nav)] > 0
    assert ("bridge_subscription_last_published_timestamp_seconds", daily) not in samples
    states = {
        (labels, value)
        for (name, labels), value in samples.items()
        if name == "bridge_subscription_state" and value == 1
    }
    assert states == {
        (tuple(sorted((*nav, ("state", "connected")))), 1.0),
        (tuple(sorted((*daily, ("state", "elsewhere")))), 1.0),
    }
    state_samples = [k for k in samples if k[0] == "bridge_subscription_state"]
    assert len(state_samples) == 2 * len(STATES)  # bounded by the rows, never by the data
