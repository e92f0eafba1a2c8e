"""The publisher against a real broker: keys, partitions, order, headers, schemas, DLQ."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import logging
import os
import uuid
from collections import defaultdict
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError

from bridge import validation
from bridge.aiokafka_internals import keep_batches_until_a_leader, sender_task
from bridge.config import KafkaSettings, Topics
from bridge.errors import ConfigError
from bridge.kafka import (
    METADATA_RETRY_S,
    admin_client,
    create_missing_topics,
    new_producer,
    producer_kwargs,
)
from bridge.publish import Publisher, discard
from bridgedev.localkafka import LocalKafka
from tests.kafkautil import read_topic, schema_error, values, wait_for
from tests.loopreports import loop_reports
from tests.samples import nav_event

pytestmark = pytest.mark.integration

SYMBOLS = ["vnfa-btca-15-r", "vnfa-etha-10-r", "vnfa-sola-5-r"]
T0 = 1_700_000_000_000


async def test_events_keyed_ordered_and_valid(kafka_settings: KafkaSettings) -> None:
    per_symbol = 200
    async with Publisher(kafka_settings) as publisher:
        for i in range(per_symbol):
            for symbol in SYMBOLS:
                await publisher.publish(nav_event(symbol, T0 + i * 1000, 100 + i))
        await publisher.flush(30)
        assert publisher.published == per_symbol * len(SYMBOLS)
        assert publisher.producer_id is not None  # the broker gave it an idempotent id

    records = await read_topic(
        kafka_settings.bootstrap_servers,
        kafka_settings.topics.nav_ticks,
        until=per_symbol * len(SYMBOLS),
        idle=0.5,
    )
    assert len(records) == per_symbol * len(SYMBOLS)
    partitions: dict[str, set[int]] = defaultdict(set)
    timestamps: dict[str, list[int]] = defaultdict(list)
    for record in records:
        assert record.key is not None
        key = record.key.decode()
        doc = orjson.loads(record.value or b"")
        assert doc["subject"] == key == doc["data"]["symbol"]
        assert schema_error(doc) is None
        assert dict(record.headers) == {
            "content-type": b"application/cloudevents+json",
            "event-type": b"vinter.nav.tick",
            "schema-version": str(validation.latest_version(doc["type"])).encode(),
        }
        partitions[key].add(record.partition)
        timestamps[key].append(doc["data"]["timestamp"])
    assert set(partitions) == set(SYMBOLS)
    for symbol in SYMBOLS:
        assert len(partitions[symbol]) == 1, "one key, one partition"
        expected = [T0 + i * 1000 for i in range(per_symbol)]
        # records come back per partition in offset order
        assert timestamps[symbol] == expected


async def test_invalid_event_goes_to_dlq_and_the_rest_flow(kafka_settings: KafkaSettings) -> None:
    good = [nav_event("vnfa-btca-15-r", T0 + i) for i in range(5)]
    bad = dataclasses.replace(good[2], id="bad-1", data={**good[2].data, "timestamp": "noon"})
    async with Publisher(kafka_settings) as publisher:
        for event in [*good[:2], bad, *good[2:]]:
            await publisher.publish(event)
        await publisher.flush(30)
        assert publisher.dead_lettered == 1

    ticks = values(
        await read_topic(
            kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks, until=5, idle=0.5
        )
    )
    assert [t["id"] for t in ticks] == [e.id for e in good]
    dead = values(
        await read_topic(
            kafka_settings.bootstrap_servers, kafka_settings.topics.dlq, until=1, idle=0.5
        )
    )
    assert len(dead) == 1
    letter = dead[0]
    assert letter["type"] == "bridge.deadletter"
    assert validation.first_error("bridge.deadletter", 1, letter) is None
    data = letter["data"]
    assert isinstance(data, dict)
    assert data["reason"] == "schema_violation"
    assert "timestamp" in data["detail"]
    assert orjson.loads(data["raw"])["id"] == "bad-1"


async def test_topics_are_created_and_state_is_compacted(kafka_settings: KafkaSettings) -> None:
    async with Publisher(kafka_settings):
        pass
    async with admin_client(kafka_settings) as admin:
        topics = set(await admin.list_topics())
        t = kafka_settings.topics
        assert {t.nav_ticks, t.vwap_ticks, t.settlements, t.dlq, t.state} <= topics
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t.state)]
        )
    entries = {e[0]: e[1] for e in described[0].resources[0][4]}
    assert entries["cleanup.policy"] == "compact"


async def test_an_admin_client_whose_bootstrap_found_no_broker_bootstraps_again(
    kafka_settings: KafkaSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiokafka's bootstrap accepts a metadata answer that lists no broker, and its admin
    client then fails every request (NodeNotReadyError): `admin_client` bootstraps again."""
    bootstrap, calls = AIOKafkaClient.bootstrap, 0

    async def no_broker_at_first(client: AIOKafkaClient) -> None:
        nonlocal calls
        calls += 1
        await bootstrap(client)
        if calls == 1:
            client.cluster._brokers.clear()  # the real broker's answer, without the broker

    monkeypatch.setattr(AIOKafkaClient, "bootstrap", no_broker_at_first)
    settings = kafka_settings.model_copy(
        update={"topics": Topics.prefixed(f"lost-{uuid.uuid4().hex[:8]}")}
    )
    async with admin_client(settings) as admin:
        await create_missing_topics(admin, settings)
        assert settings.topics.nav_ticks in set(await admin.list_topics())
    assert calls == 2


async def test_a_dead_letter_of_a_megabyte_of_random_bytes_is_acknowledged(
    kafka_settings: KafkaSettings,
) -> None:
    """Random bytes do not compress: whole, as base64, they would make a record the broker
    refuses for good (MESSAGE_TOO_LARGE), re-sent forever and holding its partition."""
    raw = os.urandom(1 << 20)
    async with Publisher(kafka_settings) as publisher:
        await publisher.dead_letter(source="s", raw=raw, reason="bad_json", key="k")
        await publisher.flush(30)
        assert publisher.send_failures == 0
    (record,) = await read_topic(
        kafka_settings.bootstrap_servers, kafka_settings.topics.dlq, until=1, idle=1.0
    )
    data = orjson.loads(record.value or b"")["data"]
    assert raw.startswith(base64.b64decode(data["raw"]))
    assert data["detail"].endswith(f"of {len(raw)} bytes kept")


async def test_a_topic_taking_smaller_records_than_a_batch_is_a_config_error(
    kafka_settings: KafkaSettings,
) -> None:
    """Kafka refuses a batch above a topic's max.message.bytes for good; re-sent forever, it
    would hold its partition. The publisher refuses to start instead, naming the fix."""
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings):
        pass  # creates the topics with the broker's default limit (1 MB): accepted
    async with admin_client(kafka_settings) as admin:
        limit = {"max.message.bytes": "65536"}
        await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, limit)])

    async def start_until_refused() -> None:
        async with asyncio.timeout(30):
            while True:  # until the broker reports the new limit
                async with Publisher(kafka_settings):
                    await asyncio.sleep(0.1)

    with pytest.raises(ConfigError) as refused:
        await start_until_refused()
    assert refused.value.key == "kafka.max_batch_size"
    assert f"topic {topic} takes records of at most 65536 bytes" in str(refused.value)
    smaller = kafka_settings.model_copy(update={"max_batch_size": 65536})
    async with Publisher(smaller) as publisher:
        await publisher.publish(nav_event("vnfa-btca-15-r", T0))
        await publisher.flush(10)


async def test_dead_sender_is_replaced_and_nothing_is_lost(kafka_settings: KafkaSettings) -> None:
    """aiokafka#1017: once the sender task ends, the producer silently stops delivering.

    The publisher must notice, rebuild the producer and re-send what was unacknowledged.
    """
    n = 300
    producers: list[AIOKafkaProducer] = []

    def factory() -> AIOKafkaProducer:
        producers.append(new_producer(kafka_settings))
        return producers[-1]

    async with Publisher(kafka_settings, producer_factory=factory) as publisher:
        for i in range(n // 2):
            await publisher.publish(nav_event("vnfa-btca-15-r", T0 + i))
        first = sender_task(producers[0])
        assert first is not None
        first.cancel()  # the sender stops for good, as in #1017
        for i in range(n // 2, n):
            await publisher.publish(nav_event("vnfa-btca-15-r", T0 + i))
        await wait_for(lambda: publisher.restarts >= 1, timeout=15)
        await publisher.flush(30)
    assert len(producers) >= 3  # the dead-letter publisher's, the first, its replacement

    records = await read_topic(
        kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks, until=n, idle=1.0
    )
    ids = [orjson.loads(r.value or b"")["id"] for r in records]
    assert set(ids) == {f"nav:vnfa-btca-15-r:{T0 + i}:1" for i in range(n)}


class _SlowStartProducer(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka has no type hints
    """A real producer whose start waits until released, as one does while the brokers
    it is pointed at do not answer."""

    entered: asyncio.Event
    release: asyncio.Event

    async def start(self) -> None:
        self.entered.set()
        await self.release.wait()
        await super().start()


async def test_events_published_while_the_producer_is_rebuilt_wait_for_it(
    kafka_settings: KafkaSettings,
) -> None:
    """A send that comes while the producer is being replaced waits for the new one (as
    when `max_in_flight` events are pending); it is not refused as if the publisher had
    been closed, which stopped a replica whose brokers were paused."""
    n = 100
    _SlowStartProducer.entered, _SlowStartProducer.release = asyncio.Event(), asyncio.Event()
    slow = False
    producers: list[AIOKafkaProducer] = []

    def factory() -> AIOKafkaProducer:
        kind = _SlowStartProducer if slow else AIOKafkaProducer
        producers.append(kind(**producer_kwargs(kafka_settings)))
        return producers[-1]

    async with Publisher(kafka_settings, producer_factory=factory) as publisher:
        for i in range(n // 2):
            await publisher.publish(nav_event("vnfa-btca-15-r", T0 + i))
        await publisher.flush(30)
        slow = True
        first = sender_task(producers[0])  # the events' producer (then the dead letters')
        assert first is not None
        first.cancel()  # the sender stops for good, as in #1017: a rebuild follows
        await asyncio.wait_for(_SlowStartProducer.entered.wait(), timeout=15)
        later = asyncio.ensure_future(_publish_range(publisher, n // 2, n))
        # Refused, it would end at once; it must still be waiting for the new producer.
        done, _ = await asyncio.wait({later}, timeout=1.0)
        assert not done, later.exception()
        _SlowStartProducer.release.set()
        await asyncio.wait_for(later, timeout=30)
        await publisher.flush(30)

    records = await read_topic(
        kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks, until=n, idle=1.0
    )
    ids = [orjson.loads(r.value or b"")["id"] for r in records]
    assert sorted(ids) == sorted(f"nav:vnfa-btca-15-r:{T0 + i}:1" for i in range(n))


async def _publish_range(publisher: Publisher, start: int, stop: int) -> None:
    for i in range(start, stop):
        await publisher.publish(nav_event("vnfa-btca-15-r", T0 + i))


class _HeldProducer(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka has no type hints
    """A real producer whose `send_batch` to one partition waits until released, as
    aiokafka's does while the partition's previous batch waits for a leader."""

    held: int = -1
    entered: asyncio.Event
    release: asyncio.Event

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        if partition == self.held and not self.release.is_set():
            self.entered.set()
            await self.release.wait()
        return await super().send_batch(batch, topic, partition=partition)


async def test_batches_filled_while_another_ships_are_sent_once(
    kafka_settings: KafkaSettings,
) -> None:
    """While the shipper waits on one partition, events keep filling the others: a batch
    that fills up meanwhile is shipped once, and the batch opened after it is not dropped."""
    settings = kafka_settings.model_copy(update={"max_batch_size": 16_384, "linger_ms": 50})
    producers: list[_HeldProducer] = []

    def factory() -> AIOKafkaProducer:
        producer = _HeldProducer(**producer_kwargs(settings))
        producer.entered, producer.release = asyncio.Event(), asyncio.Event()
        producers.append(producer)
        return producer

    topic = settings.topics.nav_ticks
    async with Publisher(settings, producer_factory=factory) as publisher:
        by_partition: dict[int, str] = {}
        for n in range(50):
            symbol = f"vnfa-s{n}-r"
            by_partition.setdefault(await publisher.partition_of(topic, symbol), symbol)
        (held, first), (_, second) = sorted(by_partition.items())[:2]
        producers[0].held = held
        # one open batch per partition, both due together; the held one is shipped first
        await publisher.publish(nav_event(first, T0))
        await publisher.publish(nav_event(second, T0))
        await asyncio.wait_for(producers[0].entered.wait(), timeout=10)
        count = 400  # several batches' worth for the other partition
        for i in range(1, count):
            await publisher.publish(nav_event(second, T0 + i))
        producers[0].release.set()
        await publisher.flush(30)
        assert publisher.restarts == 0
        assert publisher.pending == 0

    records = await read_topic(settings.bootstrap_servers, topic, until=count + 1, idle=1.0)
    stamps = [(doc["subject"], doc["data"]["timestamp"]) for doc in values(records)]
    assert [t for s, t in stamps if s == second] == [T0 + i for i in range(count)]
    assert [t for s, t in stamps if s == first] == [T0]


class _FailedRefreshes(logging.Handler):
    """When aiokafka logged each metadata refresh that reached no broker."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.at: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Unable to update metadata"):
            self.at.append(record.created)


async def test_an_outage_is_waited_out_at_a_paced_retry_and_loses_nothing() -> None:
    """A broker that goes away under load leaves produce requests in flight, and aiokafka
    then asks for metadata again as soon as an attempt fails: about 3,500 attempts a second,
    each logged at ERROR, a core spent on it. The bridge's clients wait after each failed
    one, and deliver everything once the broker is back."""
    broker = LocalKafka()
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap,
        partitions=3,
        topics=Topics.prefixed(f"o{uuid.uuid4().hex[:6]}"),
    )
    failed = _FailedRefreshes()
    aiokafka_log = logging.getLogger("aiokafka")
    aiokafka_log.addHandler(failed)
    sent = 0
    try:
        await broker.astart()
        # one client, so that the gaps measured are between its own attempts (the producer of
        # dead letters is a second client that paces its own)
        async with Publisher(settings, dead_letters=False) as publisher:

            async def upstream() -> None:
                nonlocal sent
                while True:
                    await publisher.publish(nav_event(SYMBOLS[sent % 3], T0 + sent, 100.0))
                    sent += 1
                    await asyncio.sleep(0.005)  # the upstream's pace, not a wait

            load = asyncio.create_task(upstream())
            await wait_for(lambda: publisher.published >= 100, timeout=30)
            await broker.astop(keep_dir=True)
            await wait_for(lambda: len(failed.at) >= 6, timeout=30)
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
            await broker.astart()
            await publisher.flush(60)
            assert publisher.published == sent
        records = await read_topic(broker.bootstrap, settings.topics.nav_ticks, until=sent)
    finally:
        aiokafka_log.removeHandler(failed)
        await broker.astop()
    assert len(records) == sent
    # METADATA_RETRY_S less its jitter at least between two attempts (unpaced: ~0.3 ms)
    gaps = [later - earlier for earlier, later in itertools.pairwise(failed.at)]
    assert min(gaps) >= METADATA_RETRY_S * 0.8, gaps


class _OnceBrokenBuilder:
    """A real batch builder whose `close()` fails once, as a bug in the shipping path would."""

    broken = True

    def __init__(self, builder: Any) -> None:
        self.inner = builder

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def close(self) -> Any:
        if _OnceBrokenBuilder.broken:
            _OnceBrokenBuilder.broken = False
            raise RuntimeError("a bug in the shipping path")
        return self.inner.close()


class _BreakingProducer(AIOKafkaProducer):  # type: ignore[misc]  # aiokafka has no type hints
    def create_batch(self) -> Any:
        return _OnceBrokenBuilder(super().create_batch())

    async def send_batch(self, batch: Any, topic: str, *, partition: int) -> Any:
        inner = batch.inner if isinstance(batch, _OnceBrokenBuilder) else batch
        return await super().send_batch(inner, topic, partition=partition)


async def test_a_dead_shipper_task_is_restarted_and_nothing_is_lost(
    kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """The shipper is watched as aiokafka's sender is: if its task ends, a new one takes
    over and what the old one had in hand is re-sent."""
    n = 200

    def factory() -> AIOKafkaProducer:
        return _BreakingProducer(**producer_kwargs(kafka_settings))

    _OnceBrokenBuilder.broken = True
    with caplog.at_level(logging.ERROR, logger="bridge.publish"):
        async with Publisher(kafka_settings, producer_factory=factory) as publisher:
            for i in range(n):
                await publisher.publish(nav_event("vnfa-btca-15-r", T0 + i))
            await publisher.flush(30)
            assert publisher.restarts >= 1
    assert not _OnceBrokenBuilder.broken  # the fault did happen
    assert any("shipper task ended" in r.getMessage() for r in caplog.records)
    records = await read_topic(
        kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks, until=n, idle=1.0
    )
    ids = [orjson.loads(r.value or b"")["id"] for r in records]
    assert sorted(ids) == sorted(f"nav:vnfa-btca-15-r:{T0 + i}:1" for i in range(n))


async def test_a_producer_dropped_with_batches_it_cannot_deliver_leaves_nothing_pending() -> None:
    """A rebuild drops a producer whose batches wait on a broker that does not answer.
    aiokafka's `stop()` waits for them in a task it forgets once the sender has ended;
    collected, that task was reported as "destroyed but it is pending" (an ERROR)."""
    broker = LocalKafka()
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap,
        partitions=1,
        topics=Topics.prefixed(f"d{uuid.uuid4().hex[:6]}"),
    )
    try:
        await broker.astart()
        async with admin_client(settings) as admin:
            await create_missing_topics(admin, settings)
        async with loop_reports() as reported:
            producer = new_producer(settings)
            keep_batches_until_a_leader(producer)
            await producer.start()
            await producer.partitions_for(settings.topics.nav_ticks)
            broker.pause()
            batch = producer.create_batch()
            batch.append(timestamp=None, key=b"k", value=b"v", headers=[])
            future = await producer.send_batch(batch, settings.topics.nav_ticks, partition=0)
            await discard(producer, timeout=1)
            assert future.done()  # failed: the caller re-sends it on the next producer
            assert isinstance(future.exception(), KafkaError)
            del producer, future
    finally:
        broker.resume()
        await broker.astop()
    assert reported == []
