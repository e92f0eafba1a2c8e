"""Publishing to Kafka: `Publisher` is the one public name; the rest is its machinery."""

from bridge.publish.publisher import Publisher

__all__ = ["Publisher"]
