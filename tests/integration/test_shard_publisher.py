"""The transactional shard publisher on a real broker: events committed once, a stale owner
fenced by a newer one with nothing of its last transaction visible, a batch Kafka refuses as
too large split, a checkpoint committed with its events."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from bridge.config import KafkaSettings
from bridge.events import Event
from bridge.kafka import ensure_topics, producer_kwargs
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.publish import Publisher
from bridge.publish.transactional import Fenced, ShardPublisher
from tests.kafkautil import read_topic
from tests.loopreports import loop_reports

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def tick(symbol: str, n: int, *, pad: int = 0) -> Event:
    record = {
        "id": n + 1,
        "symbol": symbol,
        "created_at": "2023-11-14T22:13:20.000Z",
        "value": 100.0 + n,
        "timestamp": T0 + n,
        "date": "2023-11-14",
    }
    if pad:
        record["note"] = os.urandom(pad // 2).hex()  # random: lz4 cannot shrink it
    return nav_tick(record, source=SOURCE_WS)


@pytest.fixture
async def dead(kafka_settings: KafkaSettings) -> AsyncIterator[Publisher]:
    async with Publisher(kafka_settings) as publisher:
        yield publisher


def shard(kafka: KafkaSettings, dead: Publisher, tid: str) -> ShardPublisher:
    return ShardPublisher(kafka, tid, dead=dead)


async def fenced_pair(
    kafka: KafkaSettings, dead: Publisher
) -> tuple[ShardPublisher, ShardPublisher]:
    """An owner that committed one event, and a newer owner of its shard whose start has
    fenced it."""
    tid = f"shard-{uuid.uuid4().hex[:8]}"
    old = shard(kafka, dead, tid)
    await old.start()
    await old.publish(tick("vnfa-a-r", 1))
    await old.flush(timeout=30)
    new = shard(kafka, dead, tid)
    await new.start()
    return old, new


def timestamps(records: list[object]) -> Counter[int]:
    return Counter(orjson.loads(r.value)["data"]["timestamp"] for r in records)  # type: ignore[attr-defined]


async def test_events_are_committed_once_and_in_order_per_key(
    kafka_settings: KafkaSettings, dead: Publisher
) -> None:
    tid = f"shard-{uuid.uuid4().hex[:8]}"
    pub = shard(kafka_settings, dead, tid)
    await pub.start()
    for n in range(3000):
        await pub.publish(tick(f"vnfa-s{n % 7}-r", n))
        if n % 500 == 0:
            await asyncio.sleep(0)  # let the committer take what is pending
    await pub.flush(timeout=30)
    assert pub.commits >= 2  # more than one transaction: the test covers the hand-off
    assert await pub.close() == 0
    records = await read_topic(kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks)
    seen = timestamps(records)
    assert len(seen) == 3000
    assert max(seen.values()) == 1
    per_key: dict[bytes, list[int]] = {}
    for r in records:
        per_key.setdefault(r.key, []).append(orjson.loads(r.value)["data"]["timestamp"])
    assert all(ts == sorted(ts) for ts in per_key.values())


async def test_a_newer_owner_fences_the_older_and_its_open_transaction_is_never_read(
    kafka_settings: KafkaSettings, dead: Publisher
) -> None:
    old, new = await fenced_pair(kafka_settings, dead)
    await old.publish(tick("vnfa-a-r", 2))  # the stale owner's next transaction
    with pytest.raises(Fenced):
        await old.flush(timeout=30)
    with pytest.raises(Fenced):
        await old.publish(tick("vnfa-a-r", 3))
    assert old.fenced
    assert not old.healthy
    await new.publish(tick("vnfa-a-r", 2))
    await new.flush(timeout=30)
    await old.close()
    await new.close()
    records = await read_topic(kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks)
    assert timestamps(records) == Counter({T0 + 1: 1, T0 + 2: 1})


async def test_a_fenced_publisher_leaves_no_error_for_asyncio_to_report(
    kafka_settings: KafkaSettings, dead: Publisher
) -> None:
    """aiokafka leaves a fenced producer's error on futures nobody awaits; collected, each
    would be logged as "Future exception was never retrieved" (an ERROR at every fencing)."""
    async with loop_reports() as reported:
        old, new = await fenced_pair(kafka_settings, dead)
        await old.publish(tick("vnfa-a-r", 2))
        with pytest.raises(Fenced):
            await old.flush(timeout=30)
        await old.close()
        await new.close()
        del old, new
    assert reported == []


async def test_a_batch_refused_as_too_large_is_split_and_only_the_offender_dead_lettered(
    kafka_settings: KafkaSettings, dead: Publisher, kafka: object
) -> None:
    await ensure_topics(kafka_settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    await admin.start()
    small = f"{kafka_settings.topics.nav_ticks}-small"
    try:
        await admin.create_topics(
            [NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "60000"})]
        )
    finally:
        await admin.close()
    pub = shard(kafka_settings, dead, f"shard-{uuid.uuid4().hex[:8]}")
    await pub.start()
    sizes = [0, 0, 40_000, 0, 200_000, 0]  # one event alone over the topic's limit
    for n, pad in enumerate(sizes):
        event = tick("vnfa-big-r", n, pad=pad)
        await pub.send(small, event.key, event.to_json(), event.headers())
    await pub.flush(timeout=60)
    await pub.close()
    await dead.flush(timeout=30)
    kept = await read_topic(kafka_settings.bootstrap_servers, small)
    assert sorted(timestamps(kept)) == [T0 + n for n in (0, 1, 2, 3, 5)]
    letters = await read_topic(kafka_settings.bootstrap_servers, kafka_settings.topics.dlq)
    assert [orjson.loads(r.value)["data"]["reason"] for r in letters] == ["too_large"]


async def test_events_and_checkpoints_of_one_commit_are_read_together(
    kafka_settings: KafkaSettings, dead: Publisher
) -> None:
    await ensure_topics(kafka_settings)
    pub = shard(kafka_settings, dead, f"shard-{uuid.uuid4().hex[:8]}")
    await pub.start()
    topic = kafka_settings.topics.nav_ticks
    await pub.commit([(topic, tick("vnfa-c-r", n)) for n in range(5)], [("marks:c", b'{"n":5}')])
    await pub.close()
    state = await read_topic(kafka_settings.bootstrap_servers, kafka_settings.topics.state)
    assert [(r.key, r.value) for r in state] == [(b"marks:c", b'{"n":5}')]
    assert len(await read_topic(kafka_settings.bootstrap_servers, topic)) == 5


class _CommitAnswerLost(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka has no type hints
    """A real producer whose first commit fails as when the brokers die mid-commit: after
    the commit reached the coordinator (`landed`), or before it was sent."""

    landed = True
    failed = 0

    async def commit_transaction(self) -> None:
        if _CommitAnswerLost.failed:
            await super().commit_transaction()
            return
        _CommitAnswerLost.failed += 1
        if _CommitAnswerLost.landed:
            await super().commit_transaction()
        raise KafkaConnectionError("connection closed before the answer came")


@pytest.mark.parametrize("landed", [True, False], ids=["commit landed", "commit never sent"])
async def test_a_commit_whose_answer_is_lost_is_read_back_not_sent_twice(
    kafka_settings: KafkaSettings, dead: Publisher, landed: bool
) -> None:
    """The coordinator completes a commit it received even if the producer never hears of
    it, and the next producer does not abort it: the events must then not be sent again.
    A commit that never reached Kafka is aborted and sent again."""
    _CommitAnswerLost.landed, _CommitAnswerLost.failed = landed, 0

    def factory(tid: str) -> AIOKafkaProducer:
        return _CommitAnswerLost(**producer_kwargs(kafka_settings), transactional_id=tid)

    pub = ShardPublisher(
        kafka_settings, f"shard-{uuid.uuid4().hex[:8]}", dead=dead, factory=factory
    )
    await pub.start()
    for n in range(200):
        await pub.publish(tick(f"vnfa-s{n % 3}-r", n))
    await pub.flush(timeout=60)
    assert _CommitAnswerLost.failed == 1  # the fault happened
    assert pub.rebuilds >= 1
    assert await pub.close() == 0
    records = await read_topic(kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks)
    seen = timestamps(records)
    assert sorted(seen) == [T0 + n for n in range(200)]
    assert max(seen.values()) == 1, [ts for ts, k in seen.items() if k > 1]
