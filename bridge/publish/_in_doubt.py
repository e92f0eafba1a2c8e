"""Whether a transaction whose commit failed after it was asked for was committed after all.

A commit request that reached the coordinator is completed by it even when the answer is
lost (the brokers died mid-commit), and the next producer of the `transactional.id` does not
abort it: sent again, its events would be read twice. Once that producer has started, the
transaction's fate is settled, and its first batch, read `read_committed`, tells which.
"""

from __future__ import annotations

import asyncio

from aiokafka import TopicPartition

from bridge.config import KafkaSettings
from bridge.kafka import short_consumer

#: (topic, partition, base offset) of a batch the transaction wrote.
Written = tuple[str, int, int]


async def was_committed(settings: KafkaSettings, written: Written, timeout: float) -> bool:
    """True if the batch at `written` is visible to `read_committed` readers, False if it was
    aborted (they skip it); call once a new producer of the transactional id has started."""
    topic, partition, offset = written
    tp = TopicPartition(topic, partition)
    async with (
        asyncio.timeout(timeout),
        short_consumer(settings, isolation_level="read_committed") as consumer,
    ):
        consumer.assign([tp])
        consumer.seek(tp, offset)
        while True:
            records = (await consumer.getmany(tp, timeout_ms=500)).get(tp, [])
            if records:
                return bool(records[0].offset == offset)
            if await consumer.position(tp) > offset:  # moved past it: aborted, skipped
                return False
