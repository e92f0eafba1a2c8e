"""Marks and versions survive a crash: newest checkpoint plus the output log written after it;
the state and output topics are what recovery needs, or the bridge says which is not."""

from __future__ import annotations

import asyncio
import logging

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bridge.config import KafkaSettings, Topics
from bridge.errors import ConfigError
from bridge.kafka import admin_client, check_topics, ensure_topics
from bridge.marks import Verdict
from bridge.normalize.nav import SOURCE_WS, mark_of, nav_tick_versioned
from bridge.publish import Publisher
from bridge.state import (
    PARTS,
    STATE_HEADERS,
    Checkpointer,
    MarkBook,
    checkpoint_key,
    read_latest,
    recover,
)
from tests.samples import DAILY, nav_event, nav_record

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


async def publish(publisher: Publisher, book: MarkBook, symbol: str, stamps: range) -> None:
    for ts in stamps:
        event, version = nav_tick_versioned(nav_record(symbol, ts), source=SOURCE_WS)
        await publisher.publish(event)
        book.published(symbol, ts, version)


async def test_recover_from_checkpoint_and_tail(kafka_settings: KafkaSettings) -> None:
    topic = kafka_settings.topics.nav_ticks
    book = MarkBook(topic)
    async with Publisher(kafka_settings) as publisher:
        checkpointer = Checkpointer(kafka_settings, publisher, [book])
        await publish(publisher, book, "a-r", range(T0, T0 + 50))
        await publish(publisher, book, "b-r", range(T0, T0 + 20))
        assert await checkpointer.checkpoint() == 1
        assert await checkpointer.checkpoint() == 0  # nothing moved since
        # Published after the checkpoint, then a "crash": no further checkpoint.
        await publish(publisher, book, "a-r", range(T0 + 50, T0 + 80))
        await publish(publisher, book, "c-r", range(T0, T0 + 5))
        await publisher.flush(30)

    parts = [checkpoint_key(topic, part) for part in range(PARTS)]
    stored = await read_latest(kafka_settings, [*parts, "absent"])
    assert set(stored) == set(parts)  # every part is written, empty ones too

    recovered = await recover(kafka_settings, topic, mark_of)
    assert recovered.snapshot() == {"a-r": T0 + 79, "b-r": T0 + 19, "c-r": T0 + 4}
    assert recovered.is_duplicate("a-r", T0 + 79)
    assert not recovered.is_duplicate("a-r", T0 + 80)
    assert recovered.versions("a-r") == book.versions("a-r")


async def test_the_versions_of_published_ticks_survive_a_restart(
    kafka_settings: KafkaSettings,
) -> None:
    topic = kafka_settings.topics.nav_ticks
    book = MarkBook(topic)
    official, version = nav_tick_versioned(dict(DAILY), source=SOURCE_WS)
    async with Publisher(kafka_settings) as publisher:
        await publisher.publish(official)
        book.published(DAILY["symbol"], DAILY["timestamp"], version)
        await Checkpointer(kafka_settings, publisher, [book]).checkpoint()
        await publisher.flush(30)
    no_checkpoint = kafka_settings.model_copy(update={"topics": _no_state(kafka_settings)})
    await ensure_topics(no_checkpoint, [no_checkpoint.topics.state])
    for restarted in (
        await recover(kafka_settings, topic, mark_of),
        await recover(no_checkpoint, topic, mark_of),  # from the log alone
    ):
        again = nav_tick_versioned(dict(DAILY), source=SOURCE_WS)[1]
        corrected = {**DAILY, "close": 1.0, "updated_at": "2023-03-01T00:00:00Z"}
        assert restarted.judge(DAILY["symbol"], DAILY["timestamp"], again)[0] is Verdict.DUPLICATE
        verdict, newest = restarted.judge(
            DAILY["symbol"], DAILY["timestamp"], nav_tick_versioned(corrected, source=SOURCE_WS)[1]
        )
        assert verdict is Verdict.REVISION
        assert newest == version


def _no_state(settings: KafkaSettings) -> Topics:
    return settings.topics.model_copy(update={"state": settings.topics.state + ".unused"})


async def test_a_missing_part_means_reading_the_whole_log(kafka_settings: KafkaSettings) -> None:
    """A checkpoint cut short before its parts were all written once: the parts found do
    not cover the keys of the others, so the log is read from its start."""
    topic = kafka_settings.topics.nav_ticks
    book = MarkBook(topic)
    async with Publisher(kafka_settings) as publisher:
        await publish(publisher, book, "early-r", range(T0, T0 + 10))
        await publisher.flush(30)
        # one part only, claiming everything so far is reflected in it
        doc = {"topic": topic, "part": 0, "offsets": {0: 10**6, 1: 10**6, 2: 10**6}}
        await publisher.send(
            kafka_settings.topics.state,
            checkpoint_key(topic, 0),
            orjson.dumps({**doc, "marks": {}, "versions": {}}, option=orjson.OPT_NON_STR_KEYS),
            STATE_HEADERS,
        )
        await publisher.flush(30)
    recovered = await recover(kafka_settings, topic, mark_of)
    assert recovered.get("early-r") == T0 + 9


async def test_a_checkpoint_of_the_single_record_format_is_read(
    kafka_settings: KafkaSettings,
) -> None:
    topic = kafka_settings.topics.nav_ticks
    async with Publisher(kafka_settings) as publisher:
        old = {"topic": topic, "offsets": {}, "marks": {"old-r": T0}}
        await publisher.send(
            kafka_settings.topics.state, checkpoint_key(topic), orjson.dumps(old), STATE_HEADERS
        )
        await publisher.publish(nav_event("new-r", T0 + 5))
        await publisher.flush(30)
    recovered = await recover(kafka_settings, topic, mark_of)
    assert recovered.snapshot() == {"old-r": T0, "new-r": T0 + 5}


async def test_a_recreated_output_topic_is_recovered_from_its_log(
    kafka_settings: KafkaSettings, caplog: pytest.LogCaptureFixture
) -> None:
    topic = kafka_settings.topics.nav_ticks
    book = MarkBook(topic)
    async with Publisher(kafka_settings) as publisher:
        await publish(publisher, book, "gone-r", range(T0, T0 + 30))
        await publisher.flush(30)  # so that the checkpoint's offsets cover them
        await Checkpointer(kafka_settings, publisher, [book]).checkpoint()
        await publisher.flush(30)
    async with admin_client(kafka_settings) as admin:
        await admin.delete_topics([topic])
    await _until_gone(kafka_settings, topic)
    await ensure_topics(kafka_settings, [topic])
    async with Publisher(kafka_settings) as publisher:
        await publisher.publish(nav_event("kept-r", T0))
        await publisher.flush(30)
    with caplog.at_level(logging.WARNING, logger="bridge.state"):
        recovered = await recover(kafka_settings, topic, mark_of)
    assert recovered.snapshot() == {"kept-r": T0}  # what the checkpoint claimed is gone
    assert f"{topic} was recreated since its last checkpoint" in caplog.text


async def _until_gone(settings: KafkaSettings, topic: str) -> None:
    async with admin_client(settings) as admin, asyncio.timeout(30):
        while topic in await admin.list_topics():  # noqa: ASYNC110 - the broker is polled
            await asyncio.sleep(0.1)


async def test_topics_recovery_cannot_rely_on_are_refused(kafka_settings: KafkaSettings) -> None:
    topics = kafka_settings.topics
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_settings.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(topics.state, 1, 1, topic_configs={"cleanup.policy": "delete"}),
                NewTopic(topics.nav_ticks, 3, 1, topic_configs={"retention.ms": "3600000"}),
            ]
        )
    finally:
        await admin.close()
    await ensure_topics(kafka_settings)
    async with admin_client(kafka_settings) as admin:
        with pytest.raises(ConfigError) as caught:
            await check_topics(admin, kafka_settings)
        assert caught.value.key == "kafka.topics.state"
        assert f"topic {topics.state} has cleanup.policy=delete" in str(caught.value)

    fixed = kafka_settings.model_copy(
        update={"topics": topics.model_copy(update={"state": topics.state + ".ok"})}
    )
    await ensure_topics(fixed)
    async with admin_client(fixed) as admin:
        await check_topics(admin, fixed)  # no retention asked for: fine
        with pytest.raises(ConfigError) as caught:
            await check_topics(admin, fixed, min_retention_ms=7 * 86_400_000)
        assert caught.value.key == "vinter.backfill_max_age_s"
        assert f"topic {topics.nav_ticks} keeps records 3600 s (retention.ms)" in str(caught.value)
        await check_topics(admin, fixed, min_retention_ms=3_600_000)
