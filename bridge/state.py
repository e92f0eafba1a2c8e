"""The `MarkBook` of each output topic, checkpointed to the compacted state topic and
recovered from Kafka: the newest checkpoint, then the output log written after it.

A checkpoint is `PARTS` records (`marks:<topic>#<n>`, each the marks and versions of the
keys that hash to it, and per partition of the output topic an offset below which every
record is reflected in them). Why that is exact, and what happens when a part is missing or
the topic was recreated: `docs/design.md` ("Marks and checkpoints").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from bridge.aiokafka_internals import client_of, partitions_now
from bridge.config import KafkaSettings
from bridge.kafka import short_consumer
from bridge.marks import KEEP_VERSIONS, Mark, MarkBook, Version
from bridge.publish import Publisher

__all__ = ["Checkpointer", "MarkBook", "read_latest", "recover"]

log = logging.getLogger(__name__)

#: What a published event says about its key: (key, mark) or (key, mark, version).
MarkOf = Callable[[dict[str, Any]], tuple[str, Mark] | tuple[str, Mark, Version] | None]
STATE_HEADERS = [("content-type", b"application/json")]
SCAN_WINDOW = 500
READ_TIMEOUT_S = 120.0
#: Records one checkpoint is split into, by a stable hash of the key, so that none grows
#: past what Kafka takes in one record.
PARTS = 16


def checkpoint_key(topic: str, part: int | None = None) -> str:
    """The state topic key of a checkpoint part (None: the single record of old versions)."""
    return f"marks:{topic}" if part is None else f"marks:{topic}#{part}"


def part_of(key: str) -> int:
    """The checkpoint part that holds `key` (stable across processes and versions)."""
    return zlib.crc32(key.encode()) % PARTS


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
    partitions = await partitions_now(client_of(consumer), topic)
    return [TopicPartition(topic, p) for p in sorted(partitions or ())]


async def _read_range(
    consumer: AIOKafkaConsumer, tp: TopicPartition, start: int, end: int
) -> list[Any]:
    """Records of one partition with offsets in [start, end).

    `end` is the last stable offset (a read_committed consumer's `end_offsets`), or a high
    watermark it passes once the transactions open below it end: the position reaches it
    (markers and aborted data are skipped), or the read times out.
    """
    consumer.seek(tp, start)
    records: list[Any] = []
    async with asyncio.timeout(READ_TIMEOUT_S):
        while await consumer.position(tp) < end:
            batch = await consumer.getmany(tp, timeout_ms=500, max_records=10_000)
            records.extend(r for r in batch.get(tp, []) if r.offset < end)
    return records


async def _read_ranges(
    consumer: AIOKafkaConsumer, ranges: dict[TopicPartition, tuple[int, int]]
) -> AsyncIterator[Any]:
    """Records with offsets in [start, end) of each partition, the partitions read side by
    side (a key's records come in their order; keys live in one partition each). The ends
    are as in `_read_range`."""
    todo = {tp: (start, end) for tp, (start, end) in ranges.items() if start < end}
    consumer.assign(list(todo))
    for tp, (start, _end) in todo.items():
        consumer.seek(tp, start)
    async with asyncio.timeout(READ_TIMEOUT_S):
        while todo:
            batch = await consumer.getmany(*todo, timeout_ms=500, max_records=10_000)
            for tp, records in batch.items():
                end = todo[tp][1]
                for record in records:
                    if record.offset < end:
                        yield record
            for tp in list(todo):
                if await consumer.position(tp) >= todo[tp][1]:
                    consumer.pause(tp)
                    del todo[tp]


async def recover(
    settings: KafkaSettings, topic: str, mark_of: MarkOf, *, keep: int = KEEP_VERSIONS
) -> MarkBook:
    """Rebuild the book of `topic`: newest checkpoint, then the output log after it."""
    began = time.monotonic()
    book = MarkBook(topic, keep=keep)
    offsets = await load_checkpoint(settings, topic, book)

    def restart() -> None:
        nonlocal book
        book = MarkBook(topic, keep=keep)

    scanned = await replay_log(
        settings, topic, offsets, mark_of, lambda _key: book, restart=restart
    )
    log.info(
        "recovered %d marks for %s (scanned %d records in %.1fs)",
        len(book),
        topic,
        scanned,
        time.monotonic() - began,
    )
    book.version = 0
    return book


async def replay_log(
    settings: KafkaSettings,
    topic: str,
    offsets: dict[int, int],
    mark_of: MarkOf,
    book_of: Callable[[str], MarkBook | None],
    *,
    restart: Callable[[], None],
    upto: dict[int, int] | None = None,
) -> int:
    """Replay `topic` from `offsets` (a checkpoint's; a partition left out: from its start)
    into `book_of(key)` for each key (None: not ours); returns how many records were read.

    Reads up to the last stable offset, and at least to `upto` (the high watermarks taken
    after a fence, so that nothing committed before it is missed). If the topic was
    recreated since the checkpoint, calls `restart()` and reads it all.
    """
    began = time.monotonic()
    scanned = 0
    async with short_consumer(settings, isolation_level="read_committed") as consumer:
        tps = await _partitions(consumer, topic)
        _step(topic, "metadata", began)
        if not tps:
            return 0
        starts = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        if upto is not None:
            ends = {tp: max(ends[tp], upto.get(tp.partition, 0)) for tp in tps}
        _step(topic, "offsets", began)
        behind = [tp.partition for tp in tps if offsets.get(tp.partition, 0) > ends[tp]]
        if behind or (offsets and max(offsets) >= len(tps)):
            log.warning(
                "%s was recreated since its last checkpoint (partitions %s end before the "
                "checkpoint's offsets): its marks are recovered from its log alone",
                topic,
                behind or sorted(p for p in offsets if p >= len(tps)),
            )
            restart()
            offsets = {}
        ranges = {tp: (max(offsets.get(tp.partition, 0), starts[tp]), ends[tp]) for tp in tps}
        async for record in _read_ranges(consumer, ranges):
            scanned += 1
            found = _mark_of_record(record.value, mark_of)
            if found is None:
                continue
            key, mark, *version = found
            book = book_of(key)
            if book is not None:
                book.replay(key, mark, version[0] if version else None)
        _step(topic, f"read {scanned} records", began)
    return scanned


async def load_checkpoint(settings: KafkaSettings, topic: str, book: MarkBook) -> dict[int, int]:
    """Load the newest checkpoint of `topic` into `book`; the offsets to read the log from.

    Every part holds the offsets it was copied at: the log is read from the lowest of them
    (re-reading what a newer part holds changes nothing). A part missing (a checkpoint cut
    short before its first complete write) means reading the log from its start, unless
    the single-record checkpoint of an older version covers it.
    """
    keys = [checkpoint_key(topic, part) for part in range(PARTS)]
    legacy = checkpoint_key(topic)
    stored = await read_latest(settings, [*keys, legacy])
    docs = [stored[key] for key in keys if stored.get(key)]
    missing = len(docs) < PARTS
    if missing and stored.get(legacy):
        docs.append(stored[legacy])
    offsets: dict[int, int] = {}
    for raw in docs:
        doc = orjson.loads(raw)  # type: ignore[arg-type]
        book.load(doc)
        for partition, offset in doc.get("offsets", {}).items():
            p = int(partition)
            offsets[p] = min(int(offset), offsets.get(p, int(offset)))
    if missing and not stored.get(legacy):
        return {}
    return offsets


def _mark_of_record(
    value: bytes | None, mark_of: MarkOf
) -> tuple[str, Mark] | tuple[str, Mark, Version] | None:
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


def encode_checkpoint(doc: dict[str, Any], max_bytes: int) -> bytes:
    """A checkpoint part as JSON; without its versions if it would exceed `max_bytes` (the
    marks alone keep recovery exact; the versions only spare a re-published revision)."""
    value = orjson.dumps(doc, option=orjson.OPT_NON_STR_KEYS)
    if len(value) > max_bytes:
        log.warning(
            "a checkpoint part of %s is %d bytes, over kafka.max_record_bytes: written "
            "without its versions (lower vinter.revisions_kept)",
            doc.get("topic"),
            len(value),
        )
        value = orjson.dumps({**doc, "versions": {}}, option=orjson.OPT_NON_STR_KEYS)
    return value


class Checkpointer:
    """Writes the books to the state topic every `interval_s`, and at close."""

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
            parts: list[list[str]] = [[] for _ in range(PARTS)]
            for key in book.marked_keys():
                parts[part_of(key)].append(key)
            states = [book.state_of(keys) for keys in parts]
            await self._publisher.barrier()
            for part, state in enumerate(states):
                doc = {"topic": book.topic, "part": part, "offsets": offsets, **state}
                value = encode_checkpoint(doc, self._settings.max_record_bytes)
                await self._publisher.send(
                    self._settings.topics.state,
                    checkpoint_key(book.topic, part),
                    value,
                    STATE_HEADERS,
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
