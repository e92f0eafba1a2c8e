"""The local Kafka broker is a real one: data round-trips, transactions, restarts."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError

from bridgedev.localkafka import LocalKafka, LocalKafkaCluster, probe_metadata

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


def sasl_ssl(bootstrap: str, ca_file: Path, password: str) -> dict[str, Any]:
    """aiokafka arguments for a SCRAM-SHA-512 client that verifies the broker certificate."""
    return {
        "bootstrap_servers": bootstrap,
        "security_protocol": "SASL_SSL",
        "ssl_context": ssl.create_default_context(cafile=str(ca_file)),
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_plain_username": "alice",
        "sasl_plain_password": password,
    }


async def sasl_round_trip(bootstrap: str, ca_file: Path, topic: str, value: bytes) -> None:
    producer = AIOKafkaProducer(**sasl_ssl(bootstrap, ca_file, "alice-secret"), acks="all")
    await producer.start()
    try:
        sent = await producer.send_and_wait(topic, value, partition=0)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        **sasl_ssl(bootstrap, ca_file, "alice-secret"), enable_auto_commit=False
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek(partition, sent.offset)
        async with asyncio.timeout(WAIT_S):
            assert (await consumer.getone()).value == value
    finally:
        await consumer.stop()


async def test_sasl_ssl_listener_with_scram_users() -> None:
    broker = LocalKafka(scram_users={"alice": "alice-secret"})
    await broker.astart()
    try:
        sasl_bootstrap, ca_pem = broker.sasl_bootstrap, broker.ca_file.read_bytes()
        assert b"PRIVATE KEY" not in ca_pem  # clients get the CA certificate only
        await create_topic(broker.bootstrap, "secured")  # PLAINTEXT still works beside it
        await sasl_round_trip(sasl_bootstrap, broker.ca_file, "secured", b"over-sasl-ssl")

        wrong = AIOKafkaAdminClient(**sasl_ssl(sasl_bootstrap, broker.ca_file, "not-hers"))
        with pytest.raises(KafkaConnectionError):
            await wrong.start()
        await wrong.close()

        await broker.astop(keep_dir=True)  # users, port and certificate survive a restart
        await broker.astart()
        assert broker.sasl_bootstrap == sasl_bootstrap
        assert broker.ca_file.read_bytes() == ca_pem
        await sasl_round_trip(sasl_bootstrap, broker.ca_file, "secured", b"after-restart")
    finally:
        await broker.astop()


def test_scram_users_must_survive_the_format_command_line() -> None:
    for users in ({}, {"alice": ""}, {"alice": "a,b"}, {"al ice": "secret"}):
        with pytest.raises(ValueError, match="scram_users"):
            LocalKafka(scram_users=users)


@pytest.mark.faults
async def test_cluster_with_sasl_ssl_listeners() -> None:
    cluster = LocalKafkaCluster(nodes=3, scram_users={"alice": "alice-secret"})
    await cluster.astart()
    try:
        assert len(set(cluster.sasl_bootstrap.split(","))) == 3
        admin = AIOKafkaAdminClient(
            **sasl_ssl(cluster.sasl_bootstrap, cluster.ca_file, "alice-secret")
        )
        await admin.start()
        try:
            await admin.create_topics([NewTopic("secured", 1, 3)])
            described = await admin.describe_cluster()
        finally:
            await admin.close()
        sasl_ports = {node.sasl_port for node in cluster.nodes}
        assert {broker["port"] for broker in described["brokers"]} == sasl_ports
        await sasl_round_trip(cluster.sasl_bootstrap, cluster.ca_file, "secured", b"replicated")
    finally:
        await cluster.astop()
