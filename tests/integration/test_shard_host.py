"""The shard host on a real broker: a shard fenced while the group still assigns it here (the
broker aborted a transaction that outlived `kafka.transaction_timeout_ms`, and bumped the
producer's epoch) starts again by itself once no rebalance has come."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from bridge.config import KafkaSettings, Settings, ShardSettings
from bridge.marks import MarkBook
from bridge.publish import Publisher
from bridge.publish.transactional import ShardPublisher
from bridge.shard_host import ShardHost
from bridge.shards import ShardPlan
from bridge.supervisor import Progress, Source
from tests.kafkautil import read_topic, wait_for

pytestmark = pytest.mark.integration


class Ticker:
    """A source that publishes `<generation>:<n>` every 20 ms through its shard."""

    name = "ticker"

    def __init__(self, publisher: ShardPublisher, topic: str, generation: int) -> None:
        self._publisher = publisher
        self._topic = topic
        self.generation = generation
        self.sent = 0

    def values(self) -> set[bytes]:
        return {f"{self.generation}:{n}".encode() for n in range(self.sent)}

    async def session(self, progress: Progress) -> None:
        progress.up()
        while True:
            value = f"{self.generation}:{self.sent}".encode()
            await self._publisher.send(self._topic, "k", value, [])
            self.sent += 1
            await asyncio.sleep(0.02)  # the source's pace


@pytest.fixture
async def dead(kafka_settings: KafkaSettings) -> AsyncIterator[Publisher]:
    async with Publisher(kafka_settings) as publisher:
        yield publisher


async def test_a_fenced_shard_still_assigned_here_starts_again(
    kafka_settings: KafkaSettings, dead: Publisher
) -> None:
    shards = ShardSettings(
        count=1,
        session_timeout_ms=1000,
        heartbeat_interval_ms=100,
        transactional_id_prefix=f"host-{uuid.uuid4().hex[:8]}",
    )
    settings = Settings(kafka=kafka_settings, shards=shards)
    topic = kafka_settings.topics.nav_ticks
    tickers: list[Ticker] = []

    def make_sources(
        plan: ShardPlan, publisher: ShardPublisher, books: dict[str, MarkBook]
    ) -> list[Source]:
        tickers.append(Ticker(publisher, topic, len(tickers)))
        return [tickers[-1]]

    host = ShardHost(settings, dead, [ShardPlan(0, nav_symbols=["x-r"])], [], make_sources)
    await host.take({0})
    await wait_for(lambda: host.healthy() and tickers[-1].sent > 10, timeout=30)

    # Another producer with the shard's transactional id bumps the epoch, as the broker does
    # when it aborts a transaction that timed out; nobody else holds the shard.
    intruder = ShardPublisher(kafka_settings, shards.transactional_id(0), dead=dead)
    await intruder.start()
    try:
        await wait_for(lambda: not host.healthy(), timeout=30)
        await wait_for(lambda: host.healthy() and len(tickers) == 2, timeout=30)
        restarted_at = tickers[1].sent
        await wait_for(lambda: tickers[1].sent > restarted_at + 10, timeout=30)
    finally:
        await host.release({0})  # the last checkpoint, then the publisher's close commit all
        await intruder.close(0)
    restarted = tickers[1].values()
    records = await read_topic(
        kafka_settings.bootstrap_servers,
        topic,
        until=lambda found: restarted <= {r.value for r in found},
        timeout=30,
    )
    assert len(records) == len({r.value for r in records})  # nothing twice
