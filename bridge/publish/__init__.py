"""Publishing to Kafka: `Publisher` (idempotent) and `EventSink`, what sources publish
through (a `Publisher` or a shard's `bridge.publish.transactional.ShardPublisher`)."""

from bridge.publish.publisher import Publisher
from bridge.publish.sink import EventSink

__all__ = ["EventSink", "Publisher"]
