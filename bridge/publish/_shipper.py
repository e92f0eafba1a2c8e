"""The one task that hands batches to aiokafka, so cancelling a caller never strands a batch
half-shipped, and batches linger to fill before they go."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer

from bridge.publish._ledger import Batch, Ledger

log = logging.getLogger(__name__)


class Shipper:
    """Ships full batches at once and an open batch `linger_s` after its first event, or,
    while its partition has a batch in flight, when that one is acknowledged: aiokafka
    carries one batch per partition per request, so filling the next batch meanwhile makes
    fewer, fuller requests.

    Args:
        ledger: where batches wait and are registered in flight.
        linger_s: how long an open batch waits for more events.
        acked: called with each batch Kafka acknowledged.
        failed: called with each batch that failed (the exception, or None if it was held
            back unsent because an older batch of its partition waits to be re-sent).
    """

    def __init__(
        self,
        ledger: Ledger,
        linger_s: float,
        acked: Callable[[Batch], None],
        failed: Callable[[Batch, BaseException | None], None],
    ) -> None:
        self.ledger = ledger
        self.producer: AIOKafkaProducer | None = None  # set by the recovery, which owns it
        self.lock = asyncio.Lock()  # held while batches are handed to aiokafka
        self._linger_s = linger_s
        self._acked = acked
        self._failed = failed
        self._wake = asyncio.Event()
        self._shipped = asyncio.Event()
        self._force = False
        self.task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.task = asyncio.create_task(self._run(), name="publisher-shipper")

    def wake(self) -> None:
        self._wake.set()

    async def ship_now(self, until: Callable[[], bool]) -> None:
        """Have the task send every open batch now and wait until it has (shipping stays in
        the task even here, so a cancelled flush strands nothing), unless `until()`."""
        ledger = self.ledger
        while (ledger.open or ledger.full) and ledger.accepting.is_set() and not until():
            self._shipped.clear()
            self._force = True
            self._wake.set()
            await self._shipped.wait()

    async def _run(self) -> None:
        ledger = self.ledger
        while True:
            await ledger.accepting.wait()  # while re-sends run, they ship; open batches wait
            deadline = min(
                (b.created for k, b in ledger.open.items() if not ledger.busy[k]), default=None
            )
            timeout = None if deadline is None else deadline + self._linger_s - time.monotonic()
            if timeout is None or timeout > 0:
                # asyncio.timeout, not wait_for: wait_for wraps the wait in a new task, and
                # this runs once or twice per batch
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            if not ledger.accepting.is_set():
                continue
            async with self.lock:
                await self._ship_ready(force=self._force)
            self._shipped.set()

    async def _ship_ready(self, *, force: bool) -> None:
        # The due open batches join the full ones in one step: `ship` may wait (aiokafka
        # holds a partition's next batch until the one before is drained), and meanwhile
        # senders keep filling `open`, moving full batches to `full` and opening new ones.
        self._force = False
        ledger = self.ledger
        now = time.monotonic()
        idle = [where for where in ledger.open if force or not ledger.busy[where]]
        if force or any(now - ledger.open[where].created >= self._linger_s for where in idle):
            # Once one batch is due the other idle ones go along, as the Java client drains
            # every partition of a broker once one is ready: one request rather than one per
            # partition, and none of their events waits longer than the oldest one's linger.
            ledger.full.extend(ledger.open.pop(where) for where in idle)
        while ledger.full:
            await self.ship(ledger.full.popleft())

    async def ship(self, batch: Batch) -> None:
        """Hand one batch to aiokafka (the caller holds `lock`, or is the task)."""
        seq, attempt = self.ledger.dispatch(batch)
        if self.producer is None or batch.where in self.ledger.held:
            # No producer, or an older batch of this partition waits to be re-sent: handing
            # this one to aiokafka now could write it first. It is re-sent after that one.
            self._settle(seq, attempt, acked=False, exc=None)
            return
        batch.builder.close()  # a closed batch is sent at once: we lingered already
        try:
            future = await self.producer.send_batch(
                batch.builder, batch.topic, partition=batch.partition
            )
        except Exception as exc:  # whatever aiokafka raised, the batch is re-sent
            self._settle(seq, attempt, acked=False, exc=exc)
            return
        future.add_done_callback(partial(self._done, seq, attempt))

    def _done(self, seq: int, attempt: int, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        self._settle(seq, attempt, acked=exc is None, exc=exc)

    def _settle(self, seq: int, attempt: int, *, acked: bool, exc: BaseException | None) -> None:
        """The outcome of one shipping: acknowledged, failed (`exc`), or held back unsent."""
        ledger = self.ledger
        batch = ledger.inflight.get(seq)
        if batch is None or batch.attempt != attempt:
            return  # an attempt from a producer that was replaced
        if ledger.partition_free(batch):
            self._wake.set()  # its next batch has been filling meanwhile
        if acked:
            ledger.acknowledged(seq, attempt)
            self._acked(batch)
        else:
            ledger.fail(seq, attempt)
            self._failed(batch, exc)
