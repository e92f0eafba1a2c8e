"""Keeping the publisher's producer usable: failed batches re-sent in order, a broken or
stalled producer rebuilt, batches too large split, the shipper task watched. When a
producer is rebuilt and when it is kept: docs/design.md, "Publishing"."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)

from bridge import events, metrics
from bridge.aiokafka_internals import (
    fail_held_batches,
    forget_fatal_error,
    keep_batches_until_a_leader,
    sender_task,
)
from bridge.config import KafkaSettings
from bridge.errors import PublishError
from bridge.publish._ledger import Batch, Item, Ledger
from bridge.publish._shipper import Shipper
from bridge.tasks import cancel_and_wait, stop_within

log = logging.getLogger(__name__)

ProducerFactory = Callable[[], AIOKafkaProducer]
#: Called with a single event Kafka refused as too large; returns False if it cannot be
#: dead-lettered (the dead-letter publisher itself: then it is cut in half and re-sent).
TooLarge = Callable[[str, Item], Awaitable[bool]]
WATCH_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 5.0
REBUILD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
# Refusals that leave the producer's sequence numbers unusable for the partition.
SEQUENCE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId)


async def discard(producer: AIOKafkaProducer, timeout: float) -> None:
    """Stop a producer, letting it deliver what it can within `timeout`, then nothing more.

    Cut short, `stop()` leaves the sender task retrying in the background; the batches it
    has not confirmed are re-sent (or counted lost) by the caller, so it is cancelled, and
    they are failed here.
    """
    with contextlib.suppress(KafkaError):
        await stop_within(producer.stop(), timeout)
    task = sender_task(producer)
    if task is not None and not task.done():
        await cancel_and_wait(task, timeout)  # it then waits for its requests on the wire
    fail_held_batches(producer, KafkaError("the producer was dropped"))
    with contextlib.suppress(KafkaError):
        await stop_within(producer.client.close(), timeout)
    forget_fatal_error(producer)


def halved(value: bytes) -> bytes:
    """A dead letter with half as much of its raw input (what Kafka refused as too large)."""
    try:
        doc = orjson.loads(value)
        data = doc["data"]
        raw = data["raw"]
        cut = len(raw) // 2
        data["raw"] = raw[: cut // 4 * 4 if data.get("raw_encoding") == "base64" else cut]
        data["detail"] = f"{data.get('detail', '')} (cut: the record was too large)"
        return events.serialize(doc)
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return value[: len(value) // 2]


class Recovery:
    """Owns the producer: starts it, watches it and the shipper, rebuilds and re-sends.

    Args:
        settings: the Kafka settings (request and stall timeouts).
        ledger, shipper: the publisher's.
        factory: makes a new, unstarted producer.
        topics: whose partitions are read at each producer start (`partitions`).
        too_large: what to do with one event Kafka refused as too large.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        ledger: Ledger,
        shipper: Shipper,
        factory: ProducerFactory,
        topics: set[str],
        too_large: TooLarge,
    ) -> None:
        self._settings = settings
        self._ledger = ledger
        self._shipper = shipper
        self._factory = factory
        self._topics = topics
        self._too_large = too_large
        self.partitions: dict[str, list[int]] = {}
        self.last_error: BaseException | None = None
        self.fatal: BaseException | None = None
        self.restarts = 0
        self.send_failures = 0
        self._last_ack = time.monotonic()
        self._outage_logged = False
        self._sequence_broken = False
        self._trouble = asyncio.Event()

    @property
    def producer(self) -> AIOKafkaProducer | None:
        return self._shipper.producer

    async def start(self) -> None:
        self._shipper.producer = await self._start_producer()
        self._ledger.opened()

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = self._factory()
        keep_batches_until_a_leader(producer)
        try:
            await asyncio.wait_for(producer.start(), self._settings.request_timeout_ms / 1000)
            for topic in self._topics:
                self.partitions[topic] = sorted(await producer.partitions_for(topic))
        except BaseException:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(producer.stop(), timeout=5)
            raise
        return producer

    # -- outcomes, from the shipper ---------------------------------------------------------

    def acknowledged(self) -> None:
        self._last_ack = time.monotonic()
        self._outage_logged = False

    def failed(self, batch: Batch, exc: BaseException | None) -> None:
        """A batch to re-send; `exc` None: held back, never sent."""
        if exc is None:
            return
        log.debug("a batch of %d events to %s failed: %r", len(batch.items), batch.topic, exc)
        self.send_failures += 1
        metrics.SEND_FAILED.labels(batch.topic).inc(len(batch.items))
        self.last_error = exc
        if isinstance(exc, SEQUENCE_ERRORS):
            self._sequence_broken = True
        elif isinstance(exc, MessageSizeTooLargeError):
            batch.too_large = True
        self._trouble.set()

    def stuck(self, topic: str, after_s: float) -> str | None:
        """Why events are not reaching `topic`: some failed, or the oldest has waited
        unacknowledged for over `after_s`; None if neither."""
        ledger = self._ledger
        oldest = ledger.oldest_unacknowledged()
        young = oldest is None or time.monotonic() - oldest < after_s
        if not ledger.waiting or (not ledger.failed and young):
            return None
        error = self.last_error
        why = f"{type(error).__name__}" if error is not None else "no acknowledgement"
        return f"{ledger.waiting} dead letters wait for topic {topic} ({why})"

    # -- watching ---------------------------------------------------------------------------

    async def probe(self, timeout: float) -> bool:
        """Whether a broker answers a metadata request right now."""
        producer = self.producer
        if producer is None:
            return False
        try:
            async with asyncio.timeout(timeout):
                await producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError, OSError):
            return False
        return True

    def _sender_dead(self) -> bool:
        # aiokafka#1017: after OutOfOrderSequenceNumber the sender task ends and the producer
        # accepts sends it will never deliver. Its task is the only sign.
        task = None if self.producer is None else sender_task(self.producer)
        return task is not None and task.done()

    def _shipper_dead(self) -> bool:
        task = self._shipper.task
        return task is not None and task.done()

    def _stalled(self) -> bool:
        return bool(self._ledger.inflight) and (
            time.monotonic() - self._last_ack > self._settings.stall_timeout_s
        )

    async def watch(self) -> None:
        """Until cancelled: act on failures, a dead sender or shipper, and stalls."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trouble.wait(), WATCH_INTERVAL_S)
            self._trouble.clear()
            try:
                if self._shipper_dead():
                    await self._restart_shipper()
                elif self._sender_dead():
                    await self._rebuild("sender_died")
                elif self._stalled():
                    if await self._unreachable():
                        self._last_ack = time.monotonic()  # an outage is not a stall
                    else:
                        await self._rebuild("stalled")
                elif self._ledger.failed:
                    await self._resend_failed()
            except (KafkaError, PublishError) as exc:
                log.error("Kafka producer cannot be rebuilt, giving up: %s", exc)  # noqa: TRY400
                self.fatal = exc
                self._ledger.room.set()
                self._ledger.idle.set()
                return

    async def _restart_shipper(self) -> None:
        """The shipper task ended: whatever it had in hand is re-sent by a new one."""
        task = self._shipper.task
        error = None if task is None or task.cancelled() else task.exception()
        log.error("the publisher's shipper task ended (%r); restarting it", error)
        metrics.PRODUCER_RESTARTS.labels("shipper_died").inc()
        self._shipper.start()
        await self._rebuild("shipper_died")

    async def _quiesce(self) -> None:
        """Stop taking new sends and let the in-flight ones settle, so re-sends keep order."""
        self._ledger.stop_taking()
        deadline = time.monotonic() + self._settings.request_timeout_ms / 1000 + 5
        # Polls: it watches a deadline and the sender task as well as the in-flight set.
        while self._ledger.inflight and time.monotonic() < deadline and not self._sender_dead():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _unreachable(self) -> bool:
        """No broker answers: an outage the producer rides out, not a producer to replace."""
        if await self.probe(timeout=PROBE_TIMEOUT_S):
            return False
        if not self._outage_logged:
            log.warning(
                "Kafka does not answer; %d events wait for it (retried with their sequence "
                "numbers, so nothing is written twice)",
                self._ledger.waiting,
            )
            self._outage_logged = True
        return True

    async def _resend_failed(self) -> None:
        await self._quiesce()
        while self._ledger.inflight and not self._sender_dead() and await self._unreachable():
            await self._quiesce()  # in-flight batches are retried as they are: wait for them
        if self._sender_dead() or self._ledger.inflight:
            await self._rebuild("sender_died" if self._sender_dead() else "stalled")
            return
        if self._sequence_broken:
            # The broker refused a sequence number: every later batch of that partition
            # would be refused too, until a new producer id starts the sequences afresh.
            await self._rebuild("sequence")
            return
        log.warning(
            "re-sending %d batches Kafka did not acknowledge: %s",
            len(self._ledger.failed),
            self.last_error,
        )
        await asyncio.sleep(min(1.0, self._settings.request_timeout_ms / 1000))
        await self._resend()

    async def _rebuild(self, reason: str) -> None:
        self._ledger.stop_taking()
        log.error("rebuilding the Kafka producer (%s): %s", reason, self.last_error)
        metrics.PRODUCER_RESTARTS.labels(reason).inc()
        self.restarts += 1
        old, self._shipper.producer = self.producer, None
        if old is not None:
            await discard(old, timeout=5)
        self._sequence_broken = False
        delays = itertools.chain(REBUILD_BACKOFF_S, itertools.repeat(REBUILD_BACKOFF_S[-1]))
        for attempt, backoff in enumerate(delays):
            try:
                self._shipper.producer = await self._start_producer()
                break
            except (KafkaError, TimeoutError) as exc:
                if not getattr(exc, "retriable", True) or attempt > 60:
                    raise PublishError(f"cannot start a Kafka producer: {exc}") from exc
                log.warning("Kafka producer start failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
        self._last_ack = time.monotonic()
        await self._resend()

    async def _resend(self) -> None:
        """Re-send what the ledger holds, in order (whatever the old producer had not
        confirmed first), then take new events again."""
        if self.producer is None:
            raise PublishError("no producer")
        async with self._shipper.lock:
            for old in self._ledger.to_resend():
                if old.too_large:
                    await self._split(old)
                else:
                    await self._rebatch(old.topic, old.partition, old.items)
        self._ledger.opened()
        self._shipper.wake()

    async def _rebatch(self, topic: str, partition: int, items: list[Item]) -> None:
        """Ship `items` again in new batches of the current producer."""
        producer = self.producer
        if producer is None:
            raise PublishError("no producer")
        batch = Batch(topic, partition, producer.create_batch())
        for item in items:
            key, value, headers, _ = item
            if not batch.builder.append(timestamp=None, key=key, value=value, headers=headers):
                await self._shipper.ship(batch)
                batch = Batch(topic, partition, producer.create_batch())
                batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
            batch.items.append(item)
        await self._shipper.ship(batch)

    async def _split(self, refused: Batch) -> None:
        """Re-send a batch Kafka refused as too large (MESSAGE_TOO_LARGE) in two halves; a
        single event is dead-lettered, a single dead letter is cut to half its size."""
        items = refused.items
        if len(items) == 1:
            if await self._too_large(refused.topic, items[0]):
                self._ledger.dropped(1)
                return
            key, value, headers, received_at = items[0]
            items = [(key, halved(value), headers, received_at)]
        middle = max(1, len(items) // 2)
        for part in (items[:middle], items[middle:]):
            if part:
                await self._rebatch(refused.topic, refused.partition, part)
