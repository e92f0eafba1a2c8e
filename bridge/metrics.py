"""Prometheus metrics of the bridge, one place, so names and labels stay consistent.

Labels never carry secrets or URLs: only source names, topics, symbols and reason codes.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RECEIVED = Counter("bridge_events_received", "Upstream records received", ["source"])
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
DEAD_LETTERS = Counter(
    "bridge_dead_letters", "Bad input sent to the dead-letter topic", ["source", "reason"]
)
RECONNECTS = Counter("bridge_reconnects", "Upstream reconnect attempts", ["source"])
CONNECTED = Gauge("bridge_sources_connected", "Upstream connections currently open", ["source"])
PENDING = Gauge("bridge_pending_events", "Events sent to Kafka and not yet acknowledged")
QUEUE_DEPTH = Gauge("bridge_queue_depth", "Events waiting between sources and the publisher")
PRODUCER_RESTARTS = Counter("bridge_producer_restarts", "Kafka producers rebuilt", ["reason"])
BACKPRESSURE = Counter("bridge_backpressure_seconds", "Time sources waited because Kafka was slow")
GAPS = Counter("bridge_gaps", "Gap events published", ["source"])
LAST_EVENT = Gauge(
    "bridge_last_event_timestamp_seconds", "Unix time of the last event per key", ["key"]
)
LATENCY = Histogram(
    "bridge_receive_to_ack_seconds",
    "From upstream receive to Kafka acknowledgement",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
