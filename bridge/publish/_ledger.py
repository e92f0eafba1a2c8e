"""Every event the publisher holds, batch by batch, from hand-over to Kafka's acknowledgement.

The ledger is the one place that knows where an event is (open, full, in flight, failed),
so nothing can be acknowledged twice or forgotten, and its count is the backpressure.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from bridge.events import Headers

# key, value, headers, monotonic receive time (for the receive->ack histogram)
Item = tuple[bytes, bytes, Headers, float | None]
Where = tuple[str, int]  # topic, partition


@dataclass(slots=True)
class Batch:
    """Events for one partition, in the aiokafka batch builder they were appended to."""

    topic: str
    partition: int
    builder: Any = None
    items: list[Item] = field(default_factory=list)
    attempt: int = 0
    created: float = field(default_factory=time.monotonic)
    too_large: bool = False  # Kafka refused it as too large: re-sent split in two

    @property
    def where(self) -> Where:
        return (self.topic, self.partition)


class Ledger:
    """Open batches per partition, full ones waiting to ship, and those in flight or failed,
    by the sequence number they were shipped under (re-sends keep that order).

    Args:
        limit: events held at most; at the limit `room` is cleared and senders wait.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[Where, Batch] = {}
        self.full: collections.deque[Batch] = collections.deque()
        self.inflight: dict[int, Batch] = {}
        self.failed: dict[int, Batch] = {}
        self.held: set[Where] = set()  # partitions with a batch in `failed`
        self.busy: collections.Counter[Where] = collections.Counter()
        self.waiting = 0  # events in open, full, in-flight and failed batches
        self.last_seq = -1
        self._attempts = itertools.count(1)
        self.accepting = asyncio.Event()  # cleared while the producer is rebuilt
        self.room = asyncio.Event()
        self.idle = asyncio.Event()

    def opened(self) -> None:
        """Ready to take events (at start, and after each rebuild or re-send)."""
        self.accepting.set()
        self.settled()

    def added(self, batch: Batch, item: Item) -> None:
        batch.items.append(item)
        self.waiting += 1
        self.idle.clear()
        if self.waiting >= self.limit:
            self.room.clear()

    def dropped(self, count: int) -> None:
        """`count` events left the ledger without an acknowledgement (dead-lettered)."""
        self.waiting -= count
        self.settled()

    def dispatch(self, batch: Batch) -> tuple[int, int]:
        """Register `batch` as in flight; its sequence number and attempt identify the
        outcome that belongs to this shipping (a replaced producer's answer does not)."""
        self.last_seq = seq = self.last_seq + 1
        batch.attempt = attempt = next(self._attempts)
        self.inflight[seq] = batch
        self.busy[batch.where] += 1
        return seq, attempt

    def acknowledged(self, seq: int, attempt: int) -> Batch | None:
        """The batch Kafka acknowledged, or None if the answer is stale."""
        batch = self.inflight.get(seq)
        if batch is None or batch.attempt != attempt:
            return None
        del self.inflight[seq]
        self.waiting -= len(batch.items)
        self.settled()
        return batch

    def fail(self, seq: int, attempt: int) -> Batch | None:
        """Move an in-flight batch to the failed ones (re-sent later, in order); None if the
        outcome is stale. Later batches of its partition are held back until then."""
        batch = self.inflight.get(seq)
        if batch is None or batch.attempt != attempt:
            return None
        del self.inflight[seq]
        self.failed[seq] = batch
        self.held.add(batch.where)
        return batch

    def partition_free(self, batch: Batch) -> bool:
        """One shipping of `batch` ended; True if its partition has none left in flight and
        an open batch that has been filling meanwhile (the shipper should wake)."""
        where = batch.where
        self.busy[where] -= 1
        if self.busy[where] > 0:
            return False
        del self.busy[where]
        return where in self.open

    def settled(self) -> None:
        if not self.waiting:
            self.idle.set()
        if self.accepting.is_set() and self.waiting < self.limit:
            self.room.set()

    def stop_taking(self) -> None:
        self.accepting.clear()
        self.room.clear()

    def unconfirmed(self) -> int:
        """The oldest sequence number not yet acknowledged (beyond `last_seq` if none)."""
        return min(itertools.chain(self.inflight, self.failed), default=self.last_seq + 1)

    def to_resend(self) -> list[Batch]:
        """Empty the ledger's queues for a re-send: failed batches in their original order,
        then the in-flight ones of a replaced producer, then the full and open ones."""
        self.failed.update(self.inflight)
        batches = [batch for _, batch in sorted(self.failed.items())]
        batches += [*self.full, *self.open.values()]
        self.inflight.clear()
        self.failed.clear()
        self.held.clear()
        self.busy.clear()
        self.full.clear()
        self.open.clear()
        return batches

    def everything(self) -> list[Batch]:
        """Every batch still held, emptying the ledger (at close: these are lost)."""
        batches = [*self.full, *self.open.values(), *self.inflight.values(), *self.failed.values()]
        self.inflight.clear()
        self.failed.clear()
        self.held.clear()
        self.full.clear()
        self.open.clear()
        return batches

    def oldest_unacknowledged(self) -> float | None:
        """When the oldest batch in flight or failed was created (monotonic), if any."""
        return min(
            (b.created for b in itertools.chain(self.inflight.values(), self.failed.values())),
            default=None,
        )
