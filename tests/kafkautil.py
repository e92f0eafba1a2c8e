"""Reading topics back in tests: bounded, read_committed, from the beginning."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord


async def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[ConsumerRecord[bytes, bytes]]], bool] | int | None = None,
    timeout: float = 30.0,
    idle: float = 0.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """All records of `topic` from the start, stopping when `until` holds (a count or a
    predicate), or after `idle` seconds without news once it holds; fails at `timeout`."""
    if isinstance(until, int):
        count = until
        until = lambda records: len(records) >= count  # noqa: E731
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        isolation_level="read_committed",
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{topic}: only {len(records)} records after {timeout}s")
            batch = await consumer.getmany(timeout_ms=int(min(left, 0.5) * 1000))
            fresh = [r for part in batch.values() for r in part]
            records.extend(fresh)
            if until is not None and until(records):
                if idle <= 0:
                    return records
                if not fresh:
                    # one quiet poll of `idle` seconds confirms nothing more is coming
                    more = await consumer.getmany(timeout_ms=int(idle * 1000))
                    extra = [r for part in more.values() for r in part]
                    records.extend(extra)
                    if not extra:
                        return records
            elif until is None and not fresh and records:
                return records
    finally:
        await consumer.stop()


def values(records: list[ConsumerRecord[bytes, bytes]]) -> list[dict[str, object]]:
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
