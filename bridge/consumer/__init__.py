"""Reading the bridge's topics back, for downstream services: typed, validated, versioned.

`EventReader` reads one or more topics from explicit positions (offsets, a time, the
beginning, the end, or a consumer group's committed offsets) up to an optional end bound,
always `read_committed`. It validates each value against the schema version it names,
upcasts older versions to the version the reader is written for, and yields one frozen
dataclass per event type (`NavTick`, `VwapTick`, `Settlement`, `Gap`, `DeadLetter`):

    async with EventReader(settings, ["vinter.nav.ticks"], start=since, stop_at_end=True) as r:
        async for event in r:
            match event:
                case NavTick(symbol=symbol, timestamp=ts): ...

`RecordReader` is the same positioning without decoding: raw records, what
`kaiko-bridge replay` copies byte for byte. `EventDecoder` is the pure part (bytes in, typed
event or `BadRecord` out) and `SchemaRegistry` holds the schemas, shipped or extra, and the
upcasters.

Ranges are half-open: `start` is the first offset read and `stop` the first one not read (an
offset, or the first record whose timestamp is at or after a time), so reading [a, b) and
then [b, c) sees every record exactly once. Bounds apply per partition.

A value that is not JSON, not a CloudEvent, of an unknown type or version, or that violates
its schema is a `BadRecord`: passed to `on_error(record, error)` when given, else raised from
the iteration, which may then go on after it. Nothing is skipped silently.
"""

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
