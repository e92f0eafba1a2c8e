"""Reading topics back in tests: bounded, read_committed, from the beginning."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from bridge.aiokafka_internals import client_of, partitions_now

Records = list[ConsumerRecord[bytes, bytes]]


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[Records], bool] | int | None = None,
    timeout: float = 30.0,
    idle: float = 0.0,
) -> Records:
    """All records of `topic` from the start, stopping when `until` holds (a count or a
    predicate), then after `idle` more seconds without news; fails at `timeout`. Without
    `until`: every record below the end offsets seen when the call starts."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level="read_committed"
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        while topic not in await consumer.topics():  # the bridge may not have created it yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"topic {topic} does not exist after {timeout}s")
            await asyncio.sleep(0.2)
        partitions = await partitions_now(client_of(consumer), topic)
        tps = [TopicPartition(topic, p) for p in sorted(partitions or ())]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        predicate = until

        async def done(records: Records) -> bool:
            if predicate is None:
                return all([await consumer.position(tp) >= end for tp, end in ends.items()])
            if isinstance(predicate, int):
                return len(records) >= predicate
            return predicate(records)

        return await _poll(consumer, done, timeout, idle)
    finally:
        await consumer.stop()


async def _poll(
    consumer: AIOKafkaConsumer,
    done: Callable[[Records], Awaitable[bool]],
    timeout: float,
    idle: float,
) -> Records:
    records: Records = []
    deadline = time.monotonic() + timeout
    while not await done(records):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"only {len(records)} records after {timeout}s")
        batch = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
        records.extend(r for part in batch.values() for r in part)
    while idle > 0 and time.monotonic() < deadline:  # confirm that nothing more is coming
        batch = await consumer.getmany(timeout_ms=int(idle * 1000))
        fresh = [r for part in batch.values() for r in part]
        if not fresh:
            break
        records.extend(fresh)
    return records


def values(records: Records) -> list[dict[str, Any]]:
    """The JSON documents (CloudEvents) of `records`, skipping tombstones."""
    return [orjson.loads(r.value) for r in records if r.value is not None]


async def wait_for(
    predicate: Callable[[], bool], timeout: float = 10.0, step: float = 0.02
) -> None:
    """Poll a condition until it holds; fail with TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)


def schema_error(doc: dict[str, Any]) -> str | None:
    """None if an event is valid against the schema version it names, else the first error."""
    from bridge import validation

    version = int(str(doc.get("dataschema", "")).rpartition(":")[2] or 0)
    return validation.first_error(str(doc.get("type")), version, doc)
