"""Publishing to Kafka: `Publisher` (idempotent) and `EventSink`, what sources publish
through (a `Publisher` or a shard's `bridge.publish.transactional.ShardPublisher`), and
`discard`, how any producer of the bridge is stopped."""

from bridge.publish._recovery import discard
from bridge.publish.publisher import Publisher
from bridge.publish.sink import EventSink

__all__ = ["EventSink", "Publisher", "discard"]
