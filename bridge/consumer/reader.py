"""`EventReader`: a `RecordReader` whose records go through an `EventDecoder`, with optional
de-duplication and a choice between raising a `BadRecord` and handing it to `on_error`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from bridge.config import KafkaSettings
from bridge.consumer.decode import DEFAULT_DEDUPE_SIZE, EventDecoder, RecentIds
from bridge.consumer.records import KafkaRecord, RecordReader, StartAt, StopAt
from bridge.consumer.schemas import SchemaRegistry
from bridge.consumer.typed import ConsumedEvent
from bridge.errors import BadRecord, ConfigError

ErrorHandler = Callable[[KafkaRecord, BadRecord], Awaitable[None] | None]


class EventReader:
    """Typed, validated events of some topics between two positions (see `RecordReader` for
    `start`, `stop`, `stop_at_end`, `partitions`, `keys`, `group_id` and `reset`).

    `versions` names the version the reader is written for per event type (default: the
    newest known); `registry` or `schema_dirs` add schemas (e.g. a version newer than this
    package) and upcasters. `dedupe=True` (or a window size) drops events whose id was seen
    recently. A bad record goes to `on_error(record, error)` (sync or async) when given,
    else `BadRecord` is raised from the iteration; iterating again goes on after it.
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
        registry: SchemaRegistry | None = None,
        schema_dirs: Iterable[str | Path] = (),
        versions: Mapping[str, int] | None = None,
        dedupe: bool | int = False,
        on_error: ErrorHandler | None = None,
    ) -> None:
        dirs = list(schema_dirs)
        if registry is not None and dirs:
            raise ConfigError("schema_dirs", "give a registry or schema_dirs, not both")
        self.decoder = EventDecoder(registry or SchemaRegistry(dirs), versions=versions)
        self.records = RecordReader(
            settings,
            topics,
            start=start,
            stop=stop,
            stop_at_end=stop_at_end,
            partitions=partitions,
            keys=keys,
            group_id=group_id,
            reset=reset,
        )
        size = DEFAULT_DEDUPE_SIZE if dedupe is True else int(dedupe)
        self._recent = RecentIds(size) if dedupe else None
        self._on_error = on_error
        self._buffer: deque[KafkaRecord] = deque()
        self._batches: AsyncGenerator[list[KafkaRecord], None] | None = None
        self.delivered = 0
        self.duplicates = 0
        self.bad_records = 0

    @property
    def registry(self) -> SchemaRegistry:
        return self.decoder.registry

    async def __aenter__(self) -> EventReader:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        await self.records.start()
        self._batches = self.records.batches(mark=False)

    async def close(self) -> None:
        """Leave Kafka. Idempotent."""
        batches, self._batches = self._batches, None
        if batches is not None:
            await batches.aclose()
        await self.records.close()

    async def commit(self) -> None:
        """Store the position after the last event delivered (or bad record surfaced)."""
        await self.records.commit()

    def progress(self) -> tuple[int, int | None]:
        return self.records.progress()

    def __aiter__(self) -> EventReader:
        return self

    async def __anext__(self) -> ConsumedEvent:
        if self._batches is None:
            raise RuntimeError("start the reader first (async with, or await start())")
        while True:
            while self._buffer:
                record = self._buffer.popleft()
                self.records._mark(record)
                try:
                    event = self.decoder.decode(record)
                except BadRecord as exc:
                    self.bad_records += 1
                    if self._on_error is None:
                        exc.add_note(f"at {record.topic} partition {record.partition}"
                                     f" offset {record.offset}")  # fmt: skip
                        raise
                    handled = self._on_error(record, exc)
                    if handled is not None:
                        await handled
                    continue
                if self._recent is not None and self._recent.seen(event.id):
                    self.duplicates += 1
                    continue
                self.delivered += 1
                return event
            batch = await anext(self._batches, None)
            if batch is None:
                raise StopAsyncIteration
            self._buffer.extend(batch)
