"""The local Kafka broker is a real one: data round-trips, transactions, restarts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.localkafka import LocalKafka, LocalKafkaCluster, probe_metadata

if TYPE_CHECKING:
    from tests.conftest import KafkaEndpoint
    from tests.conftest import NewTopic as NewTopicFactory

pytestmark = pytest.mark.integration

WAIT_S = 30.0


async def create_topic(bootstrap: str, name: str, *, partitions: int = 1, rf: int = 1) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=15000)
    await admin.start()
    try:
        response = await admin.create_topics([NewTopic(name, partitions, rf)])
    finally:
        await admin.close()
    assert [err[1] for err in response.topic_errors] == [0], response


@contextlib.asynccontextmanager
async def reader(
    bootstrap: str, topic: str, *, isolation_level: str = "read_uncommitted"
) -> AsyncIterator[AIOKafkaConsumer]:
    """A group-less consumer on partition 0 of ``topic``, from the beginning."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        isolation_level=isolation_level,
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        yield consumer
    finally:
        await consumer.stop()


async def read_values(consumer: AIOKafkaConsumer, count: int) -> list[bytes | None]:
    """The next ``count`` values, or fail after :data:`WAIT_S` seconds."""
    values: list[bytes | None] = []
    async with asyncio.timeout(WAIT_S):
        while len(values) < count:
            message = await consumer.getone()
            values.append(message.value)
    return values


async def produce(bootstrap: str, topic: str, *values: bytes) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()


async def test_produce_consume_round_trip(kafka: KafkaEndpoint, new_topic: NewTopicFactory) -> None:
    topic = await new_topic(partitions=3)
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(
            topic, b'{"price": "101.25"}', key=b"BTC-USD", headers=[("ce_type", b"vwap")]
        )
    finally:
        await producer.stop()

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=kafka.bootstrap,
        group_id=f"{topic}-group",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        async with asyncio.timeout(WAIT_S):
            message = await consumer.getone()
            await consumer.commit()
            committed = await consumer.committed(TopicPartition(topic, message.partition))
    finally:
        await consumer.stop()

    assert message.value == b'{"price": "101.25"}'
    assert message.key == b"BTC-USD"
    assert list(message.headers) == [("ce_type", b"vwap")]
    assert (message.partition, message.offset) == (sent.partition, sent.offset)
    assert committed == sent.offset + 1  # the consumer-offsets topic works too


async def test_transactional_producer(kafka: KafkaEndpoint, new_topic: NewTopicFactory) -> None:
    topic = await new_topic(partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap, transactional_id=f"{topic}-tx", acks="all"
    )
    await producer.start()
    try:
        async with asyncio.timeout(WAIT_S):
            await producer.begin_transaction()
            await producer.send(topic, b"a", partition=0)
            await producer.send(topic, b"b", partition=0)
            await producer.commit_transaction()

            await producer.begin_transaction()
            await producer.send(topic, b"aborted", partition=0)
            await producer.abort_transaction()

            async with producer.transaction():
                await producer.send(topic, b"c", partition=0)
    finally:
        await producer.stop()

    async with reader(kafka.bootstrap, topic, isolation_level="read_committed") as consumer:
        assert await read_values(consumer, 3) == [b"a", b"b", b"c"]
    async with reader(kafka.bootstrap, topic) as consumer:
        assert await read_values(consumer, 4) == [b"a", b"b", b"aborted", b"c"]


async def test_kill_and_restart_keep_data() -> None:
    broker = LocalKafka()
    await broker.astart()
    try:
        data_dir = broker.data_dir
        bootstrap = broker.bootstrap
        await create_topic(bootstrap, "durable")
        await produce(bootstrap, "durable", b"before-crash")

        await broker.akill()
        assert not broker.running
        await broker.astart()
        assert broker.bootstrap == bootstrap  # same ports after a restart
        async with reader(bootstrap, "durable") as consumer:
            assert await read_values(consumer, 1) == [b"before-crash"]
        await produce(bootstrap, "durable", b"after-crash")

        await broker.astop(keep_dir=True)
        assert not broker.running
        assert data_dir.is_dir()
        await broker.astart()
        async with reader(bootstrap, "durable") as consumer:
            assert await read_values(consumer, 2) == [b"before-crash", b"after-crash"]

        broker.pause()  # a stalled broker: connection may open, no answer
        with pytest.raises(TimeoutError):
            probe_metadata(bootstrap, timeout=1.0)
        broker.resume()
        assert probe_metadata(bootstrap).brokers[0][2] == broker.port
    finally:
        await broker.astop()
    assert not data_dir.exists()


@pytest.mark.faults
async def test_three_node_cluster_survives_one_node_down() -> None:
    cluster = LocalKafkaCluster(nodes=3)
    await cluster.astart()
    try:
        meta = probe_metadata(cluster.bootstrap)
        assert sorted(b[0] for b in meta.brokers) == [1, 2, 3]
        await create_topic(cluster.bootstrap, "replicated", rf=3)
        await produce(cluster.bootstrap, "replicated", b"one")

        await asyncio.to_thread(cluster.nodes[2].kill)
        await produce(cluster.bootstrap, "replicated", b"two")  # acks=all, 2 of 3 in sync
        async with reader(cluster.bootstrap, "replicated") as consumer:
            assert await read_values(consumer, 2) == [b"one", b"two"]

        await asyncio.to_thread(cluster.nodes[2].start)
    finally:
        await cluster.astop()
