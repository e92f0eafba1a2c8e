"""The batches of one transaction, filled as events are handed over and kept, with their
events, until the transaction commits: a failed attempt is sent again in full."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aiokafka.producer.message_accumulator import BatchBuilder

from bridge.errors import PublishError
from bridge.events import Headers
from bridge.publish._in_doubt import Written

#: (key, value, headers, received_at)
Item = tuple[bytes, bytes, Headers, float | None]
Where = tuple[str, int]
NewBuilder = Callable[[], BatchBuilder]


@dataclass
class TxnBatch:
    """One batch of a transaction: its builder and the events in it."""

    where: Where
    builder: BatchBuilder
    items: list[Item] = field(default_factory=list)
    single: bool = False  # one event per batch: Kafka refused a larger one as too large
    refused: bool = False


class Txn:
    """The events of one transaction, batched per topic-partition as they come."""

    def __init__(self) -> None:
        self._open: dict[Where, TxnBatch] = {}
        self._full: list[TxnBatch] = []
        self._single: set[Where] = set()
        self.count = 0
        self.dropped = 0  # refused one by one as too large: dead-lettered instead
        # Its first batch, once its commit was asked for: a failure from then on leaves the
        # outcome to be read back (`_in_doubt`), not assumed aborted.
        self.in_doubt: Written | None = None

    def add(self, where: Where, item: Item, new_builder: NewBuilder) -> None:
        batch = self._open.get(where)
        if batch is None:
            batch = self._open[where] = TxnBatch(where, new_builder(), single=where in self._single)
        key, value, headers, _ = item
        if (batch.single and batch.items) or not batch.builder.append(
            timestamp=None, key=key, value=value, headers=headers
        ):
            self._full.append(batch)
            batch = self._open[where] = TxnBatch(where, new_builder(), single=batch.single)
            if not batch.builder.append(timestamp=None, key=key, value=value, headers=headers):
                raise PublishError(f"a {len(value)}-byte event does not fit in a Kafka batch")
        batch.items.append(item)
        self.count += 1

    def batches(self) -> Iterator[TxnBatch]:
        yield from self._full
        yield from self._open.values()

    def per_topic(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for batch in self.batches():
            counts[batch.where[0]] = counts.get(batch.where[0], 0) + len(batch.items)
        return counts

    def rebuild(self, new_builder: NewBuilder) -> None:
        """New builders for every event (a sent builder cannot be sent again)."""
        old = list(self.batches())
        self._open, self._full, self.count = {}, [], 0
        for batch in old:
            for item in batch.items:
                self.add(batch.where, item, new_builder)

    def split_refused(self) -> list[tuple[Where, Item]]:
        """After Kafka refused batches as too large: their partitions go one event per batch
        from now on (`rebuild` next); the single events it refused are taken out."""
        out: list[tuple[Where, Item]] = []
        for batch in self.batches():
            if not batch.refused:
                continue
            batch.refused = False
            self._single.add(batch.where)
            if len(batch.items) == 1:
                out.append((batch.where, batch.items[0]))
                batch.items = []
        self.dropped += len(out)
        self.count -= len(out)
        return out
