"""High-water marks per key, checkpointed to the compacted state topic, recovered from Kafka.

A `MarkBook` holds, for one output topic, the newest upstream position published per key
(a NAV symbol's last `timestamp`, a VWAP instrument's last interval). Records at or below
the mark are duplicates and are dropped.

Recovery is snapshot plus log: a checkpoint record (`marks:<topic>` in the state topic)
holds the marks and, per partition of the output topic, an offset below which every record
is already reflected in those marks. At start the bridge loads the newest checkpoint, then
reads the output topic from those offsets to its end, so a crash between checkpoints loses
no mark and the restarted bridge neither duplicates nor skips.

Why the offsets are safe: they are read *before* the marks are copied, and the copy is
written only after every event sent before the copy was acknowledged (`Publisher.barrier`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from bridge.config import KafkaSettings
from bridge.kafka import short_consumer
from bridge.publish import Publisher

log = logging.getLogger(__name__)

Mark = int
MarkOf = Callable[[dict[str, Any]], tuple[str, Mark] | None]
STATE_HEADERS = [("content-type", b"application/json")]
SCAN_WINDOW = 500
READ_TIMEOUT_S = 120.0


class MarkBook:
    """The high-water marks of one output topic."""

    def __init__(self, topic: str, marks: dict[str, Mark] | None = None) -> None:
        self.topic = topic
        self._marks: dict[str, Mark] = dict(marks or {})
        self.version = 0  # bumps on every change, so checkpoints skip when nothing moved

    def get(self, key: str) -> Mark | None:
        return self._marks.get(key)

    def is_duplicate(self, key: str, mark: Mark) -> bool:
        last = self._marks.get(key)
        return last is not None and mark <= last

    def advance(self, key: str, mark: Mark) -> None:
        last = self._marks.get(key)
        if last is None or mark > last:
            self._marks[key] = mark
            self.version += 1

    def snapshot(self) -> dict[str, Mark]:
        return dict(self._marks)

    def __len__(self) -> int:
        return len(self._marks)


def checkpoint_key(topic: str) -> str:
    return f"marks:{topic}"


async def read_latest(settings: KafkaSettings, keys: Iterable[str]) -> dict[str, bytes | None]:
    """The newest committed value of each key in the state topic (absent keys are left out).

    Reads each partition backwards in windows, so a long uncompacted log is not read whole.
    """
    wanted = set(keys)
    found: dict[str, bytes | None] = {}
    began = time.monotonic()
    async with short_consumer(settings, isolation_level="read_committed") as consumer:
        tps = await _partitions(consumer, settings.topics.state)
        _step(settings.topics.state, "metadata", began)
        if not tps:
            return found
        consumer.assign(tps)
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        _step(settings.topics.state, "offsets", began)
        for tp in tps:
            upper = ends[tp]
            while upper > starts[tp] and not wanted <= set(found):
                lower = max(starts[tp], upper - SCAN_WINDOW)
                window: dict[str, bytes | None] = {}
                for record in await _read_range(consumer, tp, lower, upper):
                    if record.key is not None:
                        window[record.key.decode()] = record.value
                for key, value in window.items():
                    if key in wanted and key not in found:
                        found[key] = value
                upper = lower
    return found


def _step(topic: str, what: str, began: float) -> None:
    """Debug trace of a recovery step: where a slow start-up spends its time."""
    log.debug("recovery of %s: %s after %.1fs", topic, what, time.monotonic() - began)


async def _partitions(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    # aiokafka's consumer has no public call that loads one topic's metadata on demand.
    partitions = await consumer._client._wait_on_metadata(topic)
    return [TopicPartition(topic, p) for p in sorted(partitions or ())]


async def _read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
) -> list[Any]:
    """Records of one partition with offsets in [start, end).

    `end` comes from `end_offsets`, which for a read_committed consumer is the last stable
    offset, so the position always reaches it (markers and aborted data are skipped).
    """
    consumer.seek(tp, start)
    records: list[Any] = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=10_000)
            records.extend(r for r in batch.get(tp, []) if r.offset < end)
    return records


async def recover(settings: KafkaSettings, topic: str, mark_of: MarkOf) -> MarkBook:
    """Rebuild the marks of `topic`: newest checkpoint, then the output log after it."""
    began = time.monotonic()
    stored = (await read_latest(settings, [checkpoint_key(topic)])).get(checkpoint_key(topic))
    marks: dict[str, Mark] = {}
    offsets: dict[int, int] = {}
    if stored:
        doc = orjson.loads(stored)
        marks = {str(k): int(v) for k, v in doc.get("marks", {}).items()}
        offsets = {int(p): int(o) for p, o in doc.get("offsets", {}).items()}
    book = MarkBook(topic, marks)
    scanned = 0
    async with short_consumer(settings, isolation_level="read_committed") as consumer:
        tps = await _partitions(consumer, topic)
        _step(topic, "metadata", began)
        if tps:
            consumer.assign(tps)
            starts = await consumer.beginning_offsets(tps)
            ends = await consumer.end_offsets(tps)
            _step(topic, "offsets", began)
            for tp in tps:
                start = max(offsets.get(tp.partition, 0), starts[tp])
                for record in await _read_range(consumer, tp, start, ends[tp]):
                    scanned += 1
                    found = _mark_of_record(record.value, mark_of)
                    if found is not None:
                        book.advance(*found)
            _step(topic, f"read {scanned} records", began)
    log.info(
        "recovered %d marks for %s (scanned %d records in %.1fs)",
        len(book),
        topic,
        scanned,
        time.monotonic() - began,
    )
    book.version = 0
    return book


def _mark_of_record(value: bytes | None, mark_of: MarkOf) -> tuple[str, Mark] | None:
    if not value:
        return None
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    return mark_of(doc) if isinstance(doc, dict) else None


async def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    async with short_consumer(settings) as consumer:
        tps = await _partitions(consumer, topic)
        ends = await consumer.end_offsets(tps) if tps else {}
    return {tp.partition: offset for tp, offset in ends.items()}


class Checkpointer:
    """Writes the marks of some books to the state topic every `interval_s`, and at close."""

    def __init__(
        self,
        settings: KafkaSettings,
        publisher: Publisher,
        books: list[MarkBook],
        *,
        interval_s: float = 5.0,
    ) -> None:
        self._settings = settings
        self._publisher = publisher
        self._books = books
        self._interval_s = interval_s
        self._written: dict[str, int] = {}

    async def checkpoint(self) -> int:
        """Write every book that changed since its last checkpoint; returns how many."""
        written = 0
        for book in self._books:
            if self._written.get(book.topic) == book.version:
                continue
            version = book.version
            offsets = await end_offsets(self._settings, book.topic)  # before the copy: see above
            marks = book.snapshot()
            await self._publisher.barrier()
            doc = {"topic": book.topic, "offsets": offsets, "marks": marks}
            value = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
            await self._publisher.send(
                self._settings.topics.state, checkpoint_key(book.topic), value, STATE_HEADERS
            )
            self._written[book.topic] = version
            written += 1
        return written

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.checkpoint()
            except (KafkaError, TimeoutError) as exc:
                log.warning("checkpoint failed, will retry: %s", exc)

    async def close(self) -> None:
        """A last checkpoint on the way out (best effort: recovery does not depend on it)."""
        with contextlib.suppress(KafkaError, TimeoutError):
            await asyncio.wait_for(self.checkpoint(), timeout=10)
