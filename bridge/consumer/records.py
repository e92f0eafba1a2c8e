"""Raw records of some topics between two positions, read_committed: the positioning both
`EventReader` and `kaiko-bridge replay` build on. Knows nothing of events or schemas.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

from aiokafka import TopicPartition
from aiokafka.errors import KafkaConnectionError, KafkaError

from bridge.aiokafka_internals import client_of, partitions_now
from bridge.config import KafkaSettings
from bridge.errors import BridgeError, ConfigError
from bridge.kafka import new_consumer

DEFAULT_MAX_RECORDS = 10_000
POLL_TIMEOUT_S = 0.5

Offsets = int | Mapping[int, int] | Mapping[tuple[str, int], int]
"""One offset for every partition, or per partition number, or per (topic, partition)."""
StartAt = Literal["beginning", "end", "committed"] | Offsets | datetime
StopAt = Offsets | datetime


class KafkaRecord(Protocol):
    """What the readers need of a Kafka record (aiokafka's `ConsumerRecord` is one)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def timestamp(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...
    @property
    def headers(self) -> Sequence[tuple[str, bytes]]: ...


@dataclass(slots=True)
class _Partition:
    tp: Any  # aiokafka TopicPartition
    start: int
    end: int  # the end offset (last stable offset) when the reader started
    bound: int | None  # the first offset not to read, when known
    stop_ms: int | None  # or: stop at the first record at or after this time
    position: int = 0  # the next offset to read
    done: bool = False


def _epoch_ms(moment: datetime, what: str) -> int:
    if moment.tzinfo is None:
        raise ConfigError(what, "a time needs a timezone (e.g. 2024-05-01T00:00:00Z)")
    return int(moment.timestamp() * 1000)


def _offset_for(offsets: Offsets, tp: Any) -> int | None:
    if isinstance(offsets, int):
        return offsets
    for key, offset in offsets.items():
        if key in (tp.partition, (tp.topic, tp.partition)):
            return int(offset)
    return None


class RecordReader:
    """Raw records of some topics between two positions, read_committed, in offset order
    per partition.

    `start`: "beginning", "end", "committed" (the `group_id`'s offsets; `reset` where it has
    none), an offset for every partition, offsets per partition (`{partition: offset}` or
    `{(topic, partition): offset}`, naming every partition read) or an aware `datetime` (the
    first record whose timestamp is at or after it, as `offsets_for_times`). An offset the
    log no longer holds reads from the log start; one beyond its end waits for it.

    `stop` (exclusive, per partition): an offset, offsets per partition (partitions not
    named have no bound) or an aware `datetime` (stop at the first record whose timestamp is
    at or after it; when that time has passed, a partition without such a record ends where
    its log ended at start). With `stop_at_end=True`, a partition also ends at the end offset
    it had when the reader started. Iteration ends when every partition has ended, and runs
    on (waiting for new records) while one has not.

    Partitions are assigned, not balanced by a group: `group_id` only names where
    `commit()` stores offsets and where `start="committed"` reads them.
    """

    def __init__(
        self,
        settings: KafkaSettings | str,
        topics: str | Sequence[str],
        *,
        start: StartAt = "beginning",
        stop: StopAt | None = None,
        stop_at_end: bool = False,
        partitions: Iterable[int] | None = None,
        keys: Iterable[str] | None = None,
        group_id: str | None = None,
        reset: Literal["beginning", "end"] = "beginning",
        max_records: int = DEFAULT_MAX_RECORDS,
    ) -> None:
        self._settings = (
            KafkaSettings(bootstrap_servers=settings) if isinstance(settings, str) else settings
        )
        self.topics = [topics] if isinstance(topics, str) else list(topics)
        if not self.topics:
            raise ConfigError("topics", "name at least one topic")
        if start == "committed" and group_id is None:
            raise ConfigError("group_id", "start='committed' needs a group_id")
        if isinstance(start, datetime):
            _epoch_ms(start, "start")
        if isinstance(stop, datetime):
            _epoch_ms(stop, "stop")
        self._start = start
        self._stop = stop
        self.stop_at_end = stop_at_end
        self._only = None if partitions is None else sorted(set(partitions))
        self._keys = None if keys is None else {k.encode() for k in keys}
        self.group_id = group_id
        self._reset = reset
        self._max_records = max_records
        self._consumer: Any = None
        self._parts: dict[Any, _Partition] = {}
        self._consumed: dict[Any, int] = {}
        self._state: Literal["new", "open", "closed"] = "new"
        self.records_read = 0

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> RecordReader:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Connect, look the partitions up and seek each one to its start."""
        if self._state != "new":
            raise RuntimeError("a reader starts once; make a new one to read again")
        self._state = "open"
        self._consumer = new_consumer(
            self._settings,
            group_id=self.group_id,
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            request_timeout_ms=self._settings.request_timeout_ms,
        )
        try:
            await self._consumer.start()
            await self._position()
        except BaseException as exc:
            await self.close()
            where = self._settings.bootstrap_servers
            if isinstance(exc, KafkaConnectionError):
                raise BridgeError(f"cannot reach Kafka at {where}: no broker answered") from None
            if isinstance(exc, KafkaError):
                raise BridgeError(
                    f"cannot read {', '.join(self.topics)} from {where}: {exc}"
                ) from exc
            raise

    async def close(self) -> None:
        """Leave Kafka. Idempotent."""
        if self._state == "closed":
            return
        self._state = "closed"
        if self._consumer is not None:
            await self._consumer.stop()

    async def _partitions(self) -> list[Any]:
        consumer = self._consumer
        existing = await consumer.topics()
        missing = [t for t in self.topics if t not in existing]
        if missing:
            raise ConfigError("topics", f"no such topic: {', '.join(missing)}")
        tps: list[Any] = []
        for topic in self.topics:
            # aiokafka has no public call that loads one topic's metadata on demand.
            numbers = sorted(await partitions_now(client_of(consumer), topic))
            if self._only is not None:
                absent = sorted(set(self._only) - set(numbers))
                if absent:
                    raise ConfigError("partitions", f"{topic} has no partition {absent}")
                numbers = [p for p in numbers if p in self._only]
            tps.extend(TopicPartition(topic, p) for p in numbers)
        return tps

    async def _position(self) -> None:
        consumer = self._consumer
        tps = await self._partitions()
        consumer.assign(tps)
        begins = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        starts = await self._starts(tps, begins, ends)
        stops: dict[Any, int] = {}
        stop_ms: int | None = None
        if isinstance(self._stop, datetime):
            stop_ms = _epoch_ms(self._stop, "stop")
            found = await consumer.offsets_for_times(dict.fromkeys(tps, stop_ms))
            stops = {tp: int(hit.offset) for tp, hit in found.items() if hit is not None}
            if stop_ms <= time.time() * 1000:
                # A time already past: a partition with no record at or after it ends where
                # its log ends now (records written from now on carry later times).
                stops = {tp: stops.get(tp, int(ends[tp])) for tp in tps}
        elif self._stop is not None:
            for tp in tps:
                offset = _offset_for(self._stop, tp)
                if offset is not None:
                    stops[tp] = offset
        for tp in tps:
            end = int(ends[tp])
            start = max(starts[tp], int(begins[tp]))  # before the log start: from its start
            limits = (stops.get(tp), end if self.stop_at_end else None)
            bound = min((b for b in limits if b is not None), default=None)
            part = _Partition(tp, start, end, bound, stop_ms, position=start)
            self._parts[tp] = part
            # A start beyond the log end waits at the end (seeking past it would reset the
            # position) and skips records up to the start when they come.
            consumer.seek(tp, min(start, end))
            if bound is not None and start >= bound:
                self._finish(part, start)

    async def _starts(self, tps: list[Any], begins: Any, ends: Any) -> dict[Any, int]:
        consumer, start = self._consumer, self._start
        if start == "beginning":
            return {tp: int(begins[tp]) for tp in tps}
        if start == "end":
            return {tp: int(ends[tp]) for tp in tps}
        if start == "committed":
            fallback = begins if self._reset == "beginning" else ends
            starts = {}
            for tp in tps:
                committed = await consumer.committed(tp)
                starts[tp] = int(committed if committed is not None else fallback[tp])
            return starts
        if isinstance(start, datetime):
            found = await consumer.offsets_for_times(dict.fromkeys(tps, _epoch_ms(start, "start")))
            return {tp: int(ends[tp] if found.get(tp) is None else found[tp].offset) for tp in tps}
        if isinstance(start, str):
            raise ConfigError("start", f"unknown start {start!r}")
        starts = {}
        for tp in tps:
            offset = _offset_for(start, tp)
            if offset is None:
                raise ConfigError(
                    "start", f"no start offset for {tp.topic} partition {tp.partition}"
                )
            if offset < 0:
                raise ConfigError("start", f"offset {offset} is negative")
            starts[tp] = offset
        return starts

    def _finish(self, part: _Partition, at: int) -> None:
        part.done = True
        part.position = part.bound = at
        self._consumer.pause(part.tp)

    # -- reading ---------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return all(part.done for part in self._parts.values())

    def progress(self) -> tuple[int, int | None]:
        """(offsets read, offsets to read in all); the total is None while one is unbounded."""
        parts = self._parts.values()
        read = sum(part.position - part.start for part in parts)
        if any(part.bound is None for part in parts):
            return read, None
        return read, sum(max(0, (part.bound or 0) - part.start) for part in parts)

    def end_offsets(self) -> dict[tuple[str, int], int]:
        """Per (topic, partition): where reading ends (or ended); absent while unbounded."""
        return {
            (part.tp.topic, part.tp.partition): part.bound
            for part in self._parts.values()
            if part.bound is not None
        }

    async def batches(self, *, mark: bool = True) -> AsyncGenerator[list[KafkaRecord], None]:
        """Lists of records, in offset order per partition, until every partition ended.

        With `mark=True`, each list counts as handled (for `commit()`) once yielded.
        """
        if self._state != "open":
            raise RuntimeError("start the reader first (async with, or await start())")
        consumer = self._consumer
        while not self.finished:
            active = [p.tp for p in self._parts.values() if not p.done]
            fetched = await consumer.getmany(
                *active, timeout_ms=int(POLL_TIMEOUT_S * 1000), max_records=self._max_records
            )
            out: list[KafkaRecord] = []
            for tp, records in fetched.items():
                part = self._parts[tp]
                if part.done:
                    continue
                for record in records:
                    if record.offset < part.start:
                        continue
                    if self._beyond(part, record):
                        self._finish(part, record.offset)
                        break
                    part.position = record.offset + 1
                    if self._keys is None or record.key in self._keys:
                        out.append(record)
                if mark and records:
                    self._consumed[tp] = part.position
            await self._check_ends()
            if out:
                self.records_read += len(out)
                yield out

    def __aiter__(self) -> AsyncIterator[KafkaRecord]:
        return self._records()

    async def _records(self) -> AsyncIterator[KafkaRecord]:
        async for batch in self.batches(mark=False):
            for record in batch:
                self._mark(record)
                yield record

    @staticmethod
    def _beyond(part: _Partition, record: KafkaRecord) -> bool:
        if part.bound is not None and record.offset >= part.bound:
            return True
        return part.stop_ms is not None and record.timestamp >= part.stop_ms

    async def _check_ends(self) -> None:
        """End partitions whose position reached their bound.

        The position, not the last record's offset: with read_committed, transaction markers
        and aborted records take offsets no record is delivered for.
        """
        for part in self._parts.values():
            if part.done or part.bound is None:
                continue
            part.position = max(part.position, int(await self._consumer.position(part.tp)))
            if part.position >= part.bound:
                self._finish(part, part.bound)

    def _mark(self, record: KafkaRecord) -> None:
        self._consumed[TopicPartition(record.topic, record.partition)] = record.offset + 1

    async def commit(self) -> None:
        """Store, under `group_id`, the position after the last record handled per partition."""
        if self.group_id is None:
            raise ConfigError("group_id", "commit() needs a group_id")
        if self._consumed:
            try:
                await self._consumer.commit(dict(self._consumed))
            except KafkaError as exc:
                raise BridgeError(f"cannot commit offsets for {self.group_id}: {exc}") from exc
