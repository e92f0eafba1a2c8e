"""The NAV topic read in a process of its own, for the soak's tail: on a loaded 2-core host
the test's event loop, which also runs the simulators and the load, read a busy topic slower
than the bridges wrote it.

    python -m tests.faults.nav_tail_child BOOTSTRAP TOPIC

Reads TOPIC read_committed from the beginning for ever; after each fetch prints one line
with the event ids it read, separated by spaces.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.aiokafka_internals import client_of, partitions_now


async def follow(bootstrap: str, topic: str) -> None:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level="read_committed",
        auto_offset_reset="earliest",
        request_timeout_ms=15_000,
        fetch_max_wait_ms=100,
    )
    await consumer.start()
    try:
        parts: set[int] = set()
        while not parts:
            parts = await partitions_now(client_of(consumer), topic)
            await asyncio.sleep(0.2)  # until the bridge has created the topic
        consumer.assign([TopicPartition(topic, p) for p in sorted(parts)])
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=20_000)
            ids: list[str] = []
            for records in batch.values():
                for record in records:
                    with contextlib.suppress(orjson.JSONDecodeError, TypeError, KeyError):
                        ids.append(str(orjson.loads(record.value or b"")["id"]))
            sys.stdout.write(" ".join(ids) + "\n")
            sys.stdout.flush()
    finally:
        await consumer.stop()


if __name__ == "__main__":
    # the tail reads through every broker fault on purpose: aiokafka's warnings are noise
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
    asyncio.run(follow(sys.argv[1], sys.argv[2]))
