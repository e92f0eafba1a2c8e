"""The publisher against a real broker: keys, partitions, order, headers, schemas, DLQ."""

from __future__ import annotations

import dataclasses
from collections import defaultdict

import orjson
import pytest

from bridge import validation
from bridge.config import KafkaSettings
from bridge.publish import Publisher
from tests.kafkautil import read_topic, values, wait_for
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
        assert validation.first_error(doc["type"], 1, doc) is None
        assert dict(record.headers) == {
            "content-type": b"application/cloudevents+json",
            "event-type": b"vinter.nav.tick",
            "schema-version": b"1",
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
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    async with Publisher(kafka_settings):
        pass
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    await admin.start()
    try:
        topics = set(await admin.list_topics())
        t = kafka_settings.topics
        assert {t.nav_ticks, t.vwap_ticks, t.settlements, t.dlq, t.state} <= topics
        described = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, t.state)]
        )
    finally:
        await admin.close()
    entries = {e[0]: e[1] for e in described[0].resources[0][4]}
    assert entries["cleanup.policy"] == "compact"


async def test_dead_sender_is_replaced_and_nothing_is_lost(kafka_settings: KafkaSettings) -> None:
    """aiokafka#1017: once the sender task ends, the producer silently stops delivering.

    The publisher must notice, rebuild the producer and re-send what was unacknowledged.
    """
    n = 300
    async with Publisher(kafka_settings) as publisher:
        for i in range(n // 2):
            await publisher.publish(nav_event("vnfa-btca-15-r", T0 + i))
        producer = publisher._producer
        assert producer is not None
        producer._sender.sender_task.cancel()  # the sender stops for good, as in #1017
        for i in range(n // 2, n):
            await publisher.publish(nav_event("vnfa-btca-15-r", T0 + i))
        await wait_for(lambda: publisher.restarts >= 1, timeout=15)
        await publisher.flush(30)
        assert publisher._producer is not producer

    records = await read_topic(
        kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks, until=n, idle=1.0
    )
    ids = [orjson.loads(r.value or b"")["id"] for r in records]
    assert set(ids) == {f"nav:vnfa-btca-15-r:{T0 + i}" for i in range(n)}
