"""A shard's marks after a hand-over: its own checkpoint, else the topic-wide one of a version
before shards, then the log after it, up to the high watermark taken after the fence (even
while another shard's transaction is open below it)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.config import KafkaSettings
from bridge.events import Event
from bridge.kafka import ensure_topics, new_producer
from bridge.marks import Version
from bridge.normalize.nav import SOURCE_WS, mark_of, nav_tick_versioned
from bridge.publish import Publisher
from bridge.publish.transactional import ShardPublisher
from bridge.shard_state import recover_shards, shard_checkpoint
from bridge.state import Checkpointer, MarkBook, end_offsets
from tests.samples import nav_record

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
MINE = {"a-r", "b-r"}


def tick(symbol: str, ts: int) -> tuple[Event, Version]:
    return nav_tick_versioned(nav_record(symbol, ts), source=SOURCE_WS)


async def test_a_shard_recovers_its_own_keys_from_either_checkpoint_and_the_log(
    kafka_settings: KafkaSettings,
) -> None:
    topic = kafka_settings.topics.nav_ticks
    await ensure_topics(kafka_settings)
    whole = MarkBook(topic)
    async with Publisher(kafka_settings) as publisher:
        for symbol in ("a-r", "b-r", "z-r"):  # z-r belongs to another shard
            for ts in range(T0, T0 + 10):
                event, version = tick(symbol, ts)
                await publisher.publish(event)
                whole.published(symbol, ts, version)
        await Checkpointer(kafka_settings, publisher, [whole]).checkpoint()  # topic-wide
        event, _ = tick("a-r", T0 + 10)  # after the checkpoint: found in the log
        await publisher.publish(event)
        await publisher.flush(30)

        upto = await end_offsets(kafka_settings, topic)
        books = await recover_shards(
            kafka_settings, topic, mark_of, {3: MINE.__contains__}, count=12, upto=upto
        )
        assert books[3].snapshot() == {"a-r": T0 + 10, "b-r": T0 + 9}

        # The shard checkpoints in its own transaction; it wins over the topic-wide one.
        shard = ShardPublisher(kafka_settings, f"{topic}.tx-3", dead=publisher)
        await shard.start()
        try:
            own = books[3]
            event, version = tick("b-r", T0 + 50)
            await shard.publish(event)
            own.published("b-r", T0 + 50, version)
            offsets = await end_offsets(kafka_settings, topic)
            await shard.commit([], shard_checkpoint(own, 3, 12, offsets, 1_000_000))
        finally:
            await shard.close()
    upto = await end_offsets(kafka_settings, topic)
    books = await recover_shards(
        kafka_settings, topic, mark_of, {3: MINE.__contains__}, count=12, upto=upto
    )
    assert books[3].snapshot() == {"a-r": T0 + 10, "b-r": T0 + 50}


async def test_recovery_reads_past_another_shards_open_transaction(
    kafka_settings: KafkaSettings,
) -> None:
    """Shard 1's transaction is open when shard 2's previous holder commits after it: a read
    up to the last stable offset of that moment would miss shard 2's record."""
    topic = kafka_settings.topics.nav_ticks
    await ensure_topics(kafka_settings)
    other = new_producer(kafka_settings, transactional_id=f"{topic}.open")
    await other.start()
    try:
        async with Publisher(kafka_settings) as dead:
            partition = await dead.partition_of(topic, "a-r")
            await other.begin_transaction()
            event, _ = tick("z-r", T0)
            await other.send_and_wait(topic, event.to_json(), key=b"z-r", partition=partition)
            mine = ShardPublisher(kafka_settings, f"{topic}.tx-2", dead=dead)
            await mine.start()
            event, _ = tick("a-r", T0 + 5)  # committed after the open one began
            await mine.send(topic, "a-r", event.to_json(), event.headers())
            await mine.flush(30)
            await mine.close()
        upto = await end_offsets(kafka_settings, topic)  # high watermarks, open or not
        recovering = asyncio.create_task(
            recover_shards(
                kafka_settings, topic, mark_of, {2: MINE.__contains__}, count=12, upto=upto
            )
        )
        # Reading only to the last stable offset would end at once, without a-r's record.
        done, _ = await asyncio.wait([recovering], timeout=3)
        assert not done, "recovery ended while a transaction below its end was open"
        await other.commit_transaction()
        books = await asyncio.wait_for(recovering, 60)
    finally:
        await other.stop()
    assert books[2].snapshot() == {"a-r": T0 + 5}
