"""Prometheus metrics of the bridge, one place, so names and labels stay consistent.

Labels never carry secrets or URLs: only source names, topics, symbols and reason codes.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString


class LoopCount:
    """One label set of a `LoopCounter`."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self, amount: int = 1) -> None:
        self.value += amount


class LoopCounter(Collector):
    """A labelled counter for the per-message path: a plain integer per label set.

    prometheus_client's Counter takes a lock and checks its labels on every `inc`, about a
    microsecond; sources count every message. Everything that counts here runs on the event
    loop's thread, and so does the /metrics scrape, so no lock is needed.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], LoopCount] = {}
        registry.register(self)

    def labels(self, *values: str) -> LoopCount:
        return self._children.setdefault(tuple(values), LoopCount())

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self._name, self._documentation, labels=self._labelnames)
        for values, child in self._children.items():
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(Collector):
    """A histogram observed a batch at a time, on the event loop's thread (see LoopCounter).

    The events of one Kafka batch are acknowledged together: `observe_since(now, starts)`
    files all their latencies in one call, where prometheus_client's Histogram would take a
    lock and scan its buckets in Python once per event.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        buckets: Sequence[float],
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self._name, self._documentation = name, documentation
        self._bounds = tuple(sorted(buckets))
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        registry.register(self)

    def observe_since(self, now: float, starts: Iterable[float | None]) -> None:
        """Observe `now - start` for every start that is not None."""
        counts, bounds, total = self._counts, self._bounds, 0.0
        for start in starts:
            if start is not None:
                value = now - start
                counts[bisect_left(bounds, value)] += 1
                total += value
        self._sum += total

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        bounds = (*map(floatToGoString, self._bounds), "+Inf")
        for bound, count in zip(bounds, self._counts, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            self._name, self._documentation, buckets=buckets, sum_value=self._sum
        )


RECEIVED = LoopCounter("bridge_events_received", "Upstream records received", ["source"])
PUBLISHED = Counter("bridge_events_published", "Events acknowledged by Kafka", ["topic"])
SEND_FAILED = Counter(
    "bridge_send_failures", "Sends Kafka did not acknowledge (each is retried)", ["topic"]
)
LOST = Counter(
    "bridge_events_failed", "Events given up on after retries (should stay 0)", ["topic"]
)
DEDUPLICATED = Counter(
    "bridge_events_deduplicated", "Records dropped at or below the high-water mark", ["source"]
)
REVISIONS = Counter(
    "bridge_nav_revisions",
    "NAV ticks published again with other content (official value, correction)",
    ["source"],
)
FORGOTTEN = Counter(
    "bridge_nav_unrevisable",
    "NAV records for a timestamp older than the versions kept: dropped unchecked",
    ["source"],
)
GAP_CHECKS = Counter(
    "bridge_nav_gap_checks", "REST calls made to fill a jump in a live NAV feed", ["source"]
)
TOO_LARGE = Counter(
    "bridge_too_large", "Upstream messages or events over a byte limit (dead-lettered)", ["source"]
)
DEAD_LETTERS = Counter(
    "bridge_dead_letters", "Bad input sent to the dead-letter topic", ["source", "reason"]
)
RECONNECTS = Counter("bridge_reconnects", "Upstream reconnect attempts", ["source"])
CONNECTED = Gauge("bridge_sources_connected", "Upstream connections currently open", ["source"])
PENDING = Gauge("bridge_pending_events", "Events sent to Kafka and not yet acknowledged")
QUEUE_DEPTH = Gauge("bridge_queue_depth", "Events waiting between sources and the publisher")
COMMITS = LoopCounter(
    "bridge_transactions_committed", "Kafka transactions committed, per shard", ["shard"]
)
FENCED = Counter(
    "bridge_fenced_commits", "Commits refused because a newer owner took the shard", ["shard"]
)
SHARDS_HELD = Gauge("bridge_shards_held", "Shards this replica holds and runs")
READY = Gauge("bridge_ready", "1 while /readyz says ready (read at each scrape)")
KAFKA_UP = Gauge("bridge_kafka_up", "1 while a Kafka broker answers (read at each scrape)")
HANDOVERS = Counter(
    "bridge_shard_handovers", "Shards this replica took, released, or lost to a fence", ["change"]
)
PRODUCER_RESTARTS = Counter("bridge_producer_restarts", "Kafka producers rebuilt", ["reason"])
BACKPRESSURE = Counter("bridge_backpressure_seconds", "Time sources waited because Kafka was slow")
GAPS = Counter("bridge_gaps", "Gap events published", ["source"])
LAST_EVENT = Gauge(
    "bridge_last_event_timestamp_seconds", "Unix time of the last event per key", ["key"]
)
LATENCY = LoopHistogram(
    "bridge_receive_to_ack_seconds",
    "From upstream receive to Kafka acknowledgement",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
