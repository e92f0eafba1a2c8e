"""The Kafka publisher: events in, acknowledged records out, nothing lost silently. This
facade batches events per topic-partition and answers for them; `_ledger` knows where each
is, `_shipper` hands batches to aiokafka, `_recovery` keeps the producer usable (why a
batcher of its own, and how it holds sources back: docs/design.md, "Publishing")."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from operator import itemgetter

import orjson
from aiokafka.partitioner import murmur2

from bridge import aiokafka_internals, events, metrics, validation
from bridge.aiokafka_internals import producer_id
from bridge.config import KafkaSettings
from bridge.errors import PublishError
from bridge.events import Event, Headers
from bridge.kafka import admin_client, check_topics, create_missing_topics, new_producer
from bridge.publish._ledger import Batch, Item, Ledger
from bridge.publish._recovery import ProducerFactory, Recovery, discard
from bridge.publish._shipper import Shipper
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

PARTITION_CACHE_MAX = 100_000
#: Dead letters unacknowledged this long make the bridge not ready (the topic cannot be
#: written: deleted, no leader, access denied).
DLQ_STUCK_S = 10.0
_received_at = itemgetter(3)


class Publisher:
    """Publishes events to the topic of their type, keyed by symbol.

    Use as `async with Publisher(settings) as pub: await pub.publish(event)`.

    Dead letters leave through a publisher of their own, holding at most `kafka.dlq_buffer`
    of them, so a dead-letter topic that cannot be written holds up no event but those of
    a source that keeps sending bad input. `min_retention_ms`: see `kafka.check_topics`.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        *,
        producer_factory: ProducerFactory | None = None,
        min_retention_ms: int | None = None,
        max_in_flight: int | None = None,
        dead_letters: bool = True,
    ) -> None:
        self._settings = settings
        self._min_retention_ms = min_retention_ms
        self._max_record = settings.max_record_bytes
        self._dead: Publisher | None = (
            Publisher(
                settings,
                producer_factory=producer_factory,
                max_in_flight=settings.dlq_buffer,
                dead_letters=False,
            )
            if dead_letters
            else None
        )
        topics = settings.topics
        self._topic_of = {
            events.NAV_TICK: topics.nav_ticks,
            events.VWAP_TICK: topics.vwap_ticks,
            events.GAP: topics.vwap_ticks,
            events.SETTLEMENT: topics.settlements,
            events.DEAD_LETTER: topics.dlq,
        }
        self._ledger = Ledger(max_in_flight or settings.max_in_flight)
        self._shipper = Shipper(
            self._ledger, settings.linger_ms / 1000, acked=self._acked, failed=self._failed
        )
        self._recovery = Recovery(
            settings,
            ledger=self._ledger,
            shipper=self._shipper,
            factory=producer_factory or (lambda: new_producer(settings)),
            topics=self._topics(),
            too_large=self._refused_as_too_large,
        )
        self._partition_of_key: dict[tuple[str, bytes], int] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._published = {topic: metrics.PUBLISHED.labels(topic) for topic in self._topics()}
        self.published = 0
        self.dead_lettered = 0
        self.lost = 0

    def _topics(self) -> set[str]:
        return {*self._topic_of.values(), self._settings.topics.state}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await aiokafka_internals.check()
        async with admin_client(self._settings) as admin:
            if self._settings.create_topics:
                await create_missing_topics(admin, self._settings)
            await check_topics(admin, self._settings, min_retention_ms=self._min_retention_ms)
        await self._begin()
        if self._dead is not None:
            try:
                await self._dead._begin()
            except BaseException:
                await self.close(timeout=0)
                raise

    async def _begin(self) -> None:
        """Start the producer, the shipper and the watchdog."""
        await self._recovery.start()
        self._shipper.start()
        self._tasks = [asyncio.create_task(self._recovery.watch(), name="publisher-watchdog")]
        if self._dead is not None:  # the outer publisher: its count includes dead letters
            metrics.PENDING.set_function(lambda: self.pending)

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self, timeout: float = 30.0) -> None:
        """Flush what is pending (up to `timeout`), then stop. Idempotent.

        Events still unacknowledged at the end are counted as lost and logged, never dropped
        silently.
        """
        if self._closed:
            return
        await self.flush_quietly(timeout)
        if self._dead is not None:
            await self._dead.close(timeout)
            self.lost += self._dead.lost
        self._closed = True
        for task in [*self._tasks, self._shipper.task]:
            if task is not None:
                await cancel_and_wait(task)
        if self._recovery.producer is not None:
            await discard(self._recovery.producer, timeout=10)
        left = self._ledger.everything()
        for batch in left:
            metrics.LOST.labels(batch.topic).inc(len(batch.items))
        lost = sum(len(batch.items) for batch in left)
        self.lost += lost
        if lost:
            log.error("publisher closed with %d unacknowledged events (counted failed)", lost)

    def _raise_if_failed(self) -> None:
        if self._recovery.fatal is not None:
            raise PublishError("the Kafka producer failed for good") from self._recovery.fatal

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every event handed over so far is acknowledged by Kafka."""
        async with asyncio.timeout(timeout):
            await self._shipper.ship_now(until=lambda: self._recovery.fatal is not None)
            await self._ledger.idle.wait()
            if self._dead is not None:
                await self._dead.flush()
        self._raise_if_failed()

    async def flush_quietly(self, timeout: float) -> None:
        """Flush on the way out; what is still pending is counted by `close()`."""
        with contextlib.suppress(TimeoutError, PublishError):
            await self.flush(timeout)

    async def probe(self, timeout: float) -> bool:
        """Whether a broker answers a metadata request right now (for readiness)."""
        return not self._closed and await self._recovery.probe(timeout)

    async def barrier(self, timeout: float | None = None) -> None:
        """Wait until every event handed over before this call is acknowledged (checkpoints
        use it: a checkpoint must never claim an event Kafka has not taken)."""
        async with asyncio.timeout(timeout):
            await self._shipper.ship_now(until=lambda: self._recovery.fatal is not None)
            upto = self._ledger.last_seq
            while True:
                self._raise_if_failed()
                if self._ledger.unconfirmed() > upto:
                    return
                await asyncio.sleep(0.02)

    async def persist_marks(self) -> None:
        """Nothing to do: an acknowledged event is in Kafka, its mark read back from there."""

    # -- publishing ------------------------------------------------------------------------

    def topic_for(self, event_type: str) -> str:
        return self._topic_of[event_type]

    async def publish(self, event: Event, received_at: float | None = None) -> None:
        """Validate (unless `event.verified`) and send one event; an invalid event goes to the
        dead-letter topic."""
        value = await self.encoded(event)
        if value is not None:
            await self.send(
                self._topic_of[event.type], event.key, value, event.headers(), received_at
            )

    async def encoded(self, event: Event) -> bytes | None:
        """The bytes of `event`, checked against its schema unless `event.verified`; None if
        it is invalid (then it has gone to the dead-letter topic)."""
        doc = event.envelope()
        if not event.verified and not validation.validator(event.type, event.version).is_valid(doc):
            await self.dead_letter(
                source=event.source,
                raw=orjson.dumps(doc),
                reason="schema_violation",
                detail=validation.first_error(event.type, event.version, doc) or "invalid",
                key=event.key,
                event_type=event.type,
            )
            return None
        return events.serialize(doc)

    async def dead_letter(
        self,
        *,
        source: str,
        raw: bytes | str,
        reason: str,
        detail: str = "",
        key: str | None = None,
        event_type: str | None = None,
    ) -> None:
        """Send bad input to the dead-letter topic with its reason, and count it. Waits
        while `kafka.dlq_buffer` dead letters wait for Kafka."""
        metrics.DEAD_LETTERS.labels(source, reason).inc()
        self.dead_lettered += 1
        record = events.dead_letter(
            source=source,
            raw=raw,
            reason=reason,
            detail=detail,
            key=key,
            event_type=event_type,
            max_bytes=self._max_record,
        )
        out = self._dead if self._dead is not None else self
        await out.send(
            self._topic_of[events.DEAD_LETTER], record.key, record.to_json(), record.headers()
        )

    async def too_large(self, topic: str, key: str, value: bytes, headers: Headers) -> None:
        """An event over `kafka.max_record_bytes` (or refused by Kafka as too large): its
        start goes to the dead-letter topic instead, with a warning and a count."""
        source, event_type = events.origin_of(value, headers, default_source=topic)
        detail = (
            f"a {len(value)}-byte {event_type or 'record'} for {topic}, over "
            f"kafka.max_record_bytes ({self._max_record}) or the topic's max.message.bytes"
        )
        log.warning("%s: %s; dead-lettered", key, detail)
        metrics.TOO_LARGE.labels(source).inc()
        await self.dead_letter(
            source=source,
            raw=value,
            reason="too_large",
            detail=detail,
            key=key,
            event_type=event_type,
        )

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes,
        headers: Headers,
        received_at: float | None = None,
    ) -> None:
        """Hand over pre-serialized bytes; returns once they are in an open batch.

        Waits while the producer is being rebuilt or `max_in_flight` events are pending. A
        value over `kafka.max_record_bytes` is dead-lettered instead (`too_large`).
        """
        if len(value) > self._max_record:
            await self.too_large(topic, key, value, headers)
            return
        self._raise_if_failed()
        if self._closed:
            raise PublishError("the publisher is not running")
        ledger = self._ledger
        if not ledger.room.is_set():
            await self._wait_for_room()  # also while the producer is rebuilt
        key_bytes = key.encode()
        partition = self._partition_of_key.get((topic, key_bytes))
        if partition is None:
            partition = await self._partition(topic, key_bytes)
        where = (topic, partition)
        while True:
            batch = ledger.open.get(where)
            if batch is None:
                producer = self._recovery.producer
                if producer is None:
                    raise PublishError("the publisher is not running")
                batch = ledger.open[where] = Batch(topic, partition, producer.create_batch())
                if not ledger.busy[where]:
                    self._shipper.wake()  # the shipper starts this batch's linger timer
            if batch.builder.append(timestamp=None, key=key_bytes, value=value, headers=headers):
                ledger.added(batch, (key_bytes, value, headers, received_at))
                return
            del ledger.open[where]
            if not batch.items:
                raise PublishError(f"a {len(value)}-byte event does not fit in a Kafka batch")
            ledger.full.append(batch)  # full: the shipper sends it next
            self._shipper.wake()

    def _acked(self, batch: Batch) -> None:
        self._recovery.acknowledged()
        count = len(batch.items)
        self.published += count
        self._published[batch.topic].inc(count)
        metrics.LATENCY.observe_since(time.monotonic(), map(_received_at, batch.items))

    def _failed(self, batch: Batch, exc: BaseException | None) -> None:
        self._recovery.failed(batch, exc)

    async def _refused_as_too_large(self, topic: str, item: Item) -> bool:
        """One event Kafka refused as too large: dead-lettered (False from the dead-letter
        publisher itself, whose record is cut instead)."""
        if self._dead is None:
            return False
        key, value, headers, _ = item
        await self.too_large(topic, key.decode(), value, headers)
        return True

    async def _partition(self, topic: str, key: bytes) -> int:
        """Kafka's default partitioner (murmur2 of the key), cached per key."""
        partitions = self._recovery.partitions.get(topic)
        if partitions is None:
            producer = self._recovery.producer
            if producer is None:
                raise PublishError("the publisher is not running")
            partitions = self._recovery.partitions[topic] = sorted(
                await producer.partitions_for(topic)
            )
        partition: int = partitions[(int(murmur2(key)) & 0x7FFFFFFF) % len(partitions)]
        if len(self._partition_of_key) < PARTITION_CACHE_MAX:
            self._partition_of_key[(topic, key)] = partition
        return partition

    async def partition_of(self, topic: str, key: str) -> int:
        """The partition of `topic` that events keyed `key` go to."""
        return await self._partition(topic, key.encode())

    async def _wait_for_room(self) -> None:
        started = time.monotonic()
        while not self._ledger.room.is_set():
            await self._ledger.room.wait()
            self._raise_if_failed()
        metrics.BACKPRESSURE.inc(time.monotonic() - started)

    # -- introspection ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events (and dead letters) handed to the publisher and not yet acknowledged."""
        return self._ledger.waiting + (self._dead.pending if self._dead is not None else 0)

    @property
    def restarts(self) -> int:
        """How many times the producer was rebuilt."""
        return self._recovery.restarts

    @property
    def send_failures(self) -> int:
        """Batches Kafka did not take (each re-sent)."""
        return self._recovery.send_failures

    @property
    def dead_letter_trouble(self) -> str | None:
        """Why dead letters are not reaching Kafka (for readiness), or None if they are."""
        dead = self._dead
        if dead is None:
            return None
        return dead._recovery.stuck(self._settings.topics.dlq, DLQ_STUCK_S)

    @property
    def producer_id(self) -> int | None:
        """The idempotent producer id the broker assigned (None before it has one)."""
        producer = self._recovery.producer
        return None if producer is None else producer_id(producer)

    @property
    def healthy(self) -> bool:
        return self._recovery.fatal is None and not self._closed and self._ledger.accepting.is_set()
