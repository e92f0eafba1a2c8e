"""Reading the bridge's topics back, for downstream services: `EventReader` yields typed,
validated events, upcast to the reader's version and always `read_committed`;
`RecordReader` yields raw records (what `replay` copies); `EventDecoder` is the pure part.
Ranges are half-open per partition, and a value that cannot be decoded is a `BadRecord`,
passed to `on_error` or raised, never skipped (README, "Reading the topics")."""

from __future__ import annotations

from bridge.consumer.decode import DEFAULT_DEDUPE_SIZE, EventDecoder, RecentIds
from bridge.consumer.reader import EventReader
from bridge.consumer.records import KafkaRecord, RecordReader, StartAt, StopAt
from bridge.consumer.schemas import SchemaRegistry, schema_changes
from bridge.consumer.typed import ConsumedEvent, DeadLetter, Gap, NavTick, Settlement, VwapTick

__all__ = [
    "DEFAULT_DEDUPE_SIZE",
    "ConsumedEvent",
    "DeadLetter",
    "EventDecoder",
    "EventReader",
    "Gap",
    "KafkaRecord",
    "NavTick",
    "RecentIds",
    "RecordReader",
    "SchemaRegistry",
    "Settlement",
    "StartAt",
    "StopAt",
    "VwapTick",
    "schema_changes",
]
