"""Marks survive a crash: newest checkpoint plus the output log written after it."""

from __future__ import annotations

from typing import Any

import pytest

from bridge.config import KafkaSettings
from bridge.publish import Publisher
from bridge.state import Checkpointer, MarkBook, read_latest, recover
from tests.samples import nav_event

pytestmark = pytest.mark.integration


def nav_mark(doc: dict[str, Any]) -> tuple[str, int] | None:
    data = doc.get("data") or {}
    return (data["symbol"], data["timestamp"]) if doc.get("type") == "vinter.nav.tick" else None


async def publish(publisher: Publisher, book: MarkBook, symbol: str, stamps: range) -> None:
    for ts in stamps:
        await publisher.publish(nav_event(symbol, ts))
        book.advance(symbol, ts)


async def test_recover_from_checkpoint_and_tail(kafka_settings: KafkaSettings) -> None:
    topic = kafka_settings.topics.nav_ticks
    t0 = 1_700_000_000_000
    book = MarkBook(topic)
    async with Publisher(kafka_settings) as publisher:
        checkpointer = Checkpointer(kafka_settings, publisher, [book])
        await publish(publisher, book, "a-r", range(t0, t0 + 50))
        await publish(publisher, book, "b-r", range(t0, t0 + 20))
        assert await checkpointer.checkpoint() == 1
        assert await checkpointer.checkpoint() == 0  # nothing moved since
        # Published after the checkpoint, then a "crash": no further checkpoint.
        await publish(publisher, book, "a-r", range(t0 + 50, t0 + 80))
        await publish(publisher, book, "c-r", range(t0, t0 + 5))
        await publisher.flush(30)

    stored = await read_latest(kafka_settings, [f"marks:{topic}", "absent"])
    assert set(stored) == {f"marks:{topic}"}

    recovered = await recover(kafka_settings, topic, nav_mark)
    assert recovered.snapshot() == {"a-r": t0 + 79, "b-r": t0 + 19, "c-r": t0 + 4}
    assert recovered.is_duplicate("a-r", t0 + 79)
    assert not recovered.is_duplicate("a-r", t0 + 80)


async def test_recover_with_no_checkpoint_reads_the_whole_topic(
    kafka_settings: KafkaSettings,
) -> None:
    topic = kafka_settings.topics.nav_ticks
    book = MarkBook(topic)
    async with Publisher(kafka_settings) as publisher:
        await publish(publisher, book, "z-r", range(1_700_000_000_000, 1_700_000_000_010))
        await publisher.flush(30)
    recovered = await recover(kafka_settings, topic, nav_mark)
    assert recovered.snapshot() == {"z-r": 1_700_000_000_009}
