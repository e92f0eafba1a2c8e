"""Publishing to Kafka: `Publisher` (idempotent) and `EventSink`, what sources publish
through (a `Publisher` or a shard's `bridge.publish.transactional.ShardPublisher`), and
`discard`, which stops a producer that may have failed without leaving its errors unread."""

from bridge.publish._recovery import discard
from bridge.publish.publisher import Publisher
from bridge.publish.sink import EventSink

__all__ = ["EventSink", "Publisher", "discard"]
