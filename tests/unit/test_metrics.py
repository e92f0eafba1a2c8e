"""The loop-thread metrics render as ordinary Prometheus counters and histograms."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from bridge.metrics import LoopCounter, LoopHistogram
from tests.tooling import scrape


def test_counter_counts_per_label_set() -> None:
    registry = CollectorRegistry()
    counter = LoopCounter("t_received", "records", ["source"], registry=registry)
    counter.labels("a").inc()
    counter.labels("a").inc(4)
    counter.labels("b").inc()
    samples = scrape(registry)
    assert samples[("t_received_total", (("source", "a"),))] == 5
    assert samples[("t_received_total", (("source", "b"),))] == 1


def test_histogram_buckets_are_cumulative_and_inclusive() -> None:
    registry = CollectorRegistry()
    histogram = LoopHistogram("t_latency", "seconds", [0.01, 0.1, 1], registry=registry)
    histogram.observe_since(0.01, [0.0])  # on a bound: counted in that bucket (le is "<=")
    histogram.observe_since(10.0, [9.95, None, 9.0, -5.0])  # 0.05, skipped, 1.0, 15.0
    samples = scrape(registry)
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in samples.items()
        if name == "t_latency_bucket"
    }
    assert buckets == {"0.01": 1, "0.1": 2, "1.0": 3, "+Inf": 4}
    assert samples[("t_latency_count", ())] == 4
    assert abs(samples[("t_latency_sum", ())] - 16.06) < 1e-9
