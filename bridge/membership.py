"""This replica's place in the group of replicas: the partitions of the control topic it is
assigned are the shards it holds. aiokafka's listener runs every revoke before any assign
(the eager protocol), so a holder releases a shard before the group gives it to another."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from bridge.aiokafka_internals import client_of, partitions_now
from bridge.backoff import KAFKA_CAP_S, Backoff
from bridge.config import Settings
from bridge.errors import ConfigError
from bridge.kafka import admin_client, new_consumer

log = logging.getLogger(__name__)

Change = Callable[[set[int]], Awaitable[None]]


class Membership:
    """Joins the group on the control topic and calls `take` and `release` with the shards
    that move; `run()` until cancelled, then every shard held is released before leaving."""

    def __init__(self, settings: Settings, *, take: Change, release: Change) -> None:
        self._settings = settings
        self._take = take
        self._release = release
        self.held: set[int] = set()
        self.joined = False

    async def run(self) -> None:
        backoff = Backoff(cap=KAFKA_CAP_S)
        while True:
            try:
                consumer = await self._join()
            except (KafkaError, OSError, TimeoutError) as exc:
                delay = backoff.next_delay()
                log.warning("cannot join the group of replicas (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                continue
            try:
                while True:  # the control topic carries nothing: polling keeps the membership
                    await consumer.getmany(timeout_ms=1000)
            finally:
                try:
                    await self._change(self._release, set(self.held), "released")
                finally:
                    self.joined = False
                    await consumer.stop()

    async def _join(self) -> AIOKafkaConsumer:
        shards, kafka = self._settings.shards, self._settings.kafka
        await self._ensure_control_topic()
        consumer = new_consumer(
            kafka,
            group_id=shards.group_id,
            group_instance_id=shards.instance_id,
            session_timeout_ms=shards.session_timeout_ms,
            heartbeat_interval_ms=shards.heartbeat_interval_ms,
            enable_auto_commit=False,
            auto_offset_reset="latest",
        )
        consumer.subscribe([kafka.topics.control], listener=_Listener(self))
        try:
            await consumer.start()
            await self._check_partitions(consumer)
        except BaseException:
            await consumer.stop()
            raise
        return consumer

    async def _ensure_control_topic(self) -> None:
        kafka, count = self._settings.kafka, self._settings.shards.count
        if not kafka.create_topics:
            return
        async with admin_client(kafka) as admin:
            if kafka.topics.control in set(await admin.list_topics()):
                return
            topic = NewTopic(kafka.topics.control, count, kafka.replication_factor)
            with contextlib.suppress(TopicAlreadyExistsError):  # another replica was first
                await admin.create_topics([topic])

    async def _check_partitions(self, consumer: AIOKafkaConsumer) -> None:
        topic, count = self._settings.kafka.topics.control, self._settings.shards.count
        partitions = await partitions_now(client_of(consumer), topic)
        if partitions is not None and len(partitions) != count:
            raise ConfigError(
                "shards.count",
                f"{count}, but the control topic {topic} has {len(partitions)} partitions (one "
                "per shard): set shards.count to match, or name a new kafka.topics.control",
            )

    async def _change(self, change: Change, shards: set[int], what: str) -> None:
        if not shards:
            return
        log.info("shards %s: %s", what, sorted(shards))
        try:
            await change(shards)
        except Exception:  # aiokafka would swallow it: say it loudly instead
            log.exception("shards %s: failed", what)

    async def revoked(self, shards: set[int]) -> None:
        self.joined = False
        await self._change(self._release, shards & self.held, "released")
        self.held -= shards

    async def assigned(self, shards: set[int]) -> None:
        self.held |= shards
        self.joined = True
        await self._change(self._take, shards, "taken")


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, membership: Membership) -> None:
        self._membership = membership

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._membership.revoked({tp.partition for tp in revoked})

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self._membership.assigned({tp.partition for tp in assigned})
