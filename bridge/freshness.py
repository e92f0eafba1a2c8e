"""Freshness per configured subscription, for the stale-symbol alert and the live view.

One row per subscription the configuration names, so the label sets are bounded by it and
never by upstream data: when its newest record was published here, how far behind that
record's own timestamp it was, the silence after which it is stale, and its session's state.
Every replica exports every row: `max by (feed, subscription)` across replicas gives the
newest publication, and only the holder says anything but `elsewhere`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge.supervisor import SourceState

#: What a subscription's session is doing: `elsewhere` when another replica holds it.
STATES: Final = ("connected", "backfilling", "parked", "down", "elsewhere")


@dataclass(slots=True)
class Row:
    """One subscription: `source` is the name of the source that publishes it."""

    feed: str
    subscription: str
    source: str
    stale_after_s: float
    published_at: float | None = None  # Unix time of the newest publication here
    lag_s: float | None = None  # how far behind its record's own timestamp that was
    backfilling: bool = False

    def published(self, upstream_s: float) -> None:
        """A record with upstream timestamp `upstream_s` (Unix seconds) was just published."""
        now = time.time()
        self.published_at = now
        self.lag_s = max(0.0, now - upstream_s)


def state_of(row: Row, states: Mapping[str, SourceState]) -> str:
    """The row's state, from its source's state in this replica (absent: held elsewhere)."""
    state = states.get(row.source)
    if state is None:
        return "elsewhere"
    if state.parked:
        return "parked"
    if not state.connected:
        return "down"
    return "backfilling" if row.backfilling else "connected"


class Board(Collector):
    """The rows, exported as gauges at each scrape."""

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self._rows: dict[tuple[str, str], Row] = {}
        self._states: Callable[[], Mapping[str, SourceState]] = dict
        if registry is not None:
            registry.register(self)

    def row(self, feed: str, subscription: str, *, source: str, stale_after_s: float) -> Row:
        """The row of (`feed`, `subscription`), made on first use."""
        found = self._rows.get((feed, subscription))
        if found is None:
            found = self._rows[(feed, subscription)] = Row(
                feed, subscription, source, stale_after_s
            )
        return found

    def rows(self) -> list[Row]:
        return list(self._rows.values())

    def watch(self, states: Callable[[], Mapping[str, SourceState]]) -> None:
        """Where the sources' states come from (the shards this replica runs)."""
        self._states = states

    def states(self) -> dict[tuple[str, str], str]:
        """Every row's state now, by (feed, subscription)."""
        states = self._states()
        return {key: state_of(row, states) for key, row in self._rows.items()}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["feed", "subscription"]
        published = GaugeMetricFamily(
            "bridge_subscription_last_published_timestamp_seconds",
            "Unix time this replica last published a record of the subscription",
            labels=labels,
        )
        lag = GaugeMetricFamily(
            "bridge_subscription_upstream_lag_seconds",
            "How far behind its upstream timestamp the last record published was",
            labels=labels,
        )
        stale = GaugeMetricFamily(
            "bridge_subscription_stale_after_seconds",
            "Silence after which the subscription counts as stale",
            labels=labels,
        )
        session = GaugeMetricFamily(
            "bridge_subscription_state",
            "1 for the state the subscription's session is in here",
            labels=[*labels, "state"],
        )
        states = self.states()
        for key, row in self._rows.items():
            values = [row.feed, row.subscription]
            if row.published_at is not None and row.lag_s is not None:
                published.add_metric(values, row.published_at)
                lag.add_metric(values, row.lag_s)
            stale.add_metric(values, row.stale_after_s)
            now = states[key]
            for state in STATES:
                session.add_metric([*values, state], 1.0 if state == now else 0.0)
        yield from (published, lag, stale, session)


BOARD: Final = Board()
