"""The marks of the shards a replica takes, recovered from Kafka, and their checkpoints.

Each shard checkpoints its own keys (`marks:<topic>@<shard>/<count>#<part>`) inside its
own transactions, so a fenced owner can never overwrite its successor's. A shard without a
checkpoint of its own falls back on the topic-wide checkpoint of a version before shards.
Why the log is read up to the high watermark taken after the fence: docs/design.md,
"Shards and fencing".
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from bridge.config import KafkaSettings
from bridge.marks import KEEP_VERSIONS, MarkBook
from bridge.state import (
    PARTS,
    MarkOf,
    encode_checkpoint,
    load_checkpoint,
    read_latest,
    replay_log,
)

log = logging.getLogger(__name__)

#: Whether a mark key belongs to a shard.
Owns = Callable[[str], bool]


def parts_per_shard(count: int) -> int:
    """Records one shard's checkpoint is split into: about `PARTS` per topic in all."""
    return max(1, PARTS // count)


def shard_checkpoint_key(topic: str, shard: int, count: int, part: int) -> str:
    return f"marks:{topic}@{shard}/{count}#{part}"


def shard_checkpoint(
    book: MarkBook, shard: int, count: int, offsets: Mapping[int, int], max_bytes: int
) -> list[tuple[str, bytes]]:
    """The state records (key, value) of one shard's book; `offsets` were read before the
    marks were copied, so every record of the shard's keys below them is reflected."""
    parts = parts_per_shard(count)
    keys: list[list[str]] = [[] for _ in range(parts)]
    for key in book.marked_keys():
        keys[zlib.crc32(key.encode()) % parts].append(key)
    records = []
    for part in range(parts):
        doc = {
            "topic": book.topic,
            "shard": shard,
            "shards": count,
            "part": part,
            "offsets": dict(offsets),
            **book.state_of(keys[part]),
        }
        records.append(
            (
                shard_checkpoint_key(book.topic, shard, count, part),
                encode_checkpoint(doc, max_bytes),
            )
        )
    return records


async def recover_shards(
    settings: KafkaSettings,
    topic: str,
    mark_of: MarkOf,
    owners: Mapping[int, Owns],
    *,
    count: int,
    upto: dict[int, int],
    keep: int = KEEP_VERSIONS,
) -> dict[int, MarkBook]:
    """The book of each shard in `owners` (shard -> which keys are its): its checkpoint,
    then the log after it, up to at least `upto` (high watermarks taken after the fence)."""
    began = time.monotonic()
    books = {shard: MarkBook(topic, keep=keep) for shard in owners}
    parts = parts_per_shard(count)
    wanted = {
        shard: [shard_checkpoint_key(topic, shard, count, p) for p in range(parts)]
        for shard in owners
    }
    stored = await read_latest(settings, [key for keys in wanted.values() for key in keys])
    offsets: dict[int, int] | None = {}
    orphans: list[int] = []
    for shard, keys in wanted.items():
        docs = [stored.get(key) for key in keys]
        if not all(docs):
            orphans.append(shard)
            continue
        for raw in docs:
            doc = orjson.loads(raw)  # type: ignore[arg-type]
            books[shard].load(doc)
            offsets = _lowest(offsets, doc.get("offsets", {}))
    if orphans:  # no checkpoint of their own: the topic-wide one, if any
        whole = MarkBook(topic, keep=keep)
        found = await load_checkpoint(settings, topic, whole)
        offsets = _lowest(offsets, found) if found else None
        for shard in orphans:
            mine = [key for key in whole.marked_keys() if owners[shard](key)]
            books[shard].load(whole.state_of(mine))

    def book_of(key: str) -> MarkBook | None:
        shard = route.get(key, -1)
        if shard == -1:
            shard = route[key] = next((n for n, owns in owners.items() if owns(key)), None)
        return books[shard] if shard is not None else None

    def restart() -> None:
        for shard in books:
            books[shard] = MarkBook(topic, keep=keep)

    route: dict[str, int | None] = {}
    scanned = await replay_log(
        settings, topic, offsets or {}, mark_of, book_of, restart=restart, upto=upto
    )
    for book in books.values():
        book.version = 0
    log.info(
        "recovered %d marks of %d shards for %s (scanned %d records in %.1fs)",
        sum(len(book) for book in books.values()),
        len(books),
        topic,
        scanned,
        time.monotonic() - began,
    )
    return books


def _lowest(offsets: dict[int, int] | None, more: Mapping[Any, int]) -> dict[int, int] | None:
    """The lower offset per partition (None: read from the start, whatever `more` says)."""
    if offsets is None:
        return None
    merged = dict(offsets)
    for partition, offset in more.items():
        p = int(partition)
        merged[p] = min(int(offset), merged.get(p, int(offset)))
    return merged
