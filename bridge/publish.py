"""The Kafka publisher: validated events in, acknowledged records out, nothing lost silently.

Events are appended to one open batch per topic-partition (aiokafka's batch API), shipped
when full or after `linger_ms`, and tracked batch by batch until Kafka acknowledges them:
one future per batch instead of one per event is what makes this path fast.

A batch that fails is kept and its events re-sent in their original order once the
in-flight batches have settled; later batches of its partition are held back until then,
so none overtakes it. If the producer itself is broken (its sender task died, e.g. after
`OutOfOrderSequenceNumber`, aiokafka#1017; a broker refused its sequence numbers; or
nothing has been acknowledged for `stall_timeout_s` while batches are pending and brokers
answer) it is rebuilt first. At most `max_in_flight` events wait for Kafka: then `publish`
waits, and so do the sources that call it. That wait is the backpressure that reaches the
upstream sockets.

While no broker answers at all, the producer is kept, however long that lasts: its
in-flight batches are retried by aiokafka with their producer id and sequence numbers, so
a broker that had already written one (the acknowledgement lost with the broker) drops the
retry. A new producer would write those events a second time, after newer ones.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
    UnknownProducerId,
)
from aiokafka.partitioner import murmur2

from bridge import aiokafka_internals, events, metrics, validation
from bridge.aiokafka_internals import keep_batches_until_a_leader, producer_id, sender_task
from bridge.config import KafkaSettings
from bridge.errors import PublishError
from bridge.events import Event, Headers
from bridge.kafka import (
    admin_client,
    check_topics,
    create_missing_topics,
    new_producer,
)

log = logging.getLogger(__name__)

ProducerFactory = Callable[[], AIOKafkaProducer]
WATCH_INTERVAL_S = 1.0
PROBE_TIMEOUT_S = 5.0
REBUILD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)
PARTITION_CACHE_MAX = 100_000
#: Dead letters unacknowledged this long make the bridge not ready (the topic cannot be
#: written: deleted, no leader, access denied).
DLQ_STUCK_S = 10.0
# Refusals that leave the producer's sequence numbers unusable for the partition.
SEQUENCE_ERRORS = (OutOfOrderSequenceNumber, UnknownProducerId)

# key, value, headers, monotonic receive time (for the receive->ack histogram)
Item = tuple[bytes, bytes, Headers, float | None]
_received_at = itemgetter(3)


@dataclass(slots=True)
class _Batch:
    topic: str
    partition: int
    builder: Any = None
    items: list[Item] = field(default_factory=list)
    attempt: int = 0
    created: float = field(default_factory=time.monotonic)
    too_large: bool = False  # Kafka refused it as too large: re-sent split in two


async def _discard(producer: AIOKafkaProducer, timeout: float) -> None:
    """Stop a producer, letting it deliver what it can within `timeout`, then nothing more.

    `stop()` waits for every pending batch; cut short, it leaves the sender task retrying
    them in the background. The batches it has not confirmed are re-sent (or counted lost)
    by the caller, so a sender still at work could write them a second time: cancel it.
    """
    with contextlib.suppress(KafkaError, TimeoutError):
        await asyncio.wait_for(producer.stop(), timeout=timeout)
    task = sender_task(producer)
    if task is not None and not task.done():
        task.cancel()  # it then waits for its requests on the wire; not for long
        with contextlib.suppress(asyncio.CancelledError, KafkaError, TimeoutError):
            await asyncio.wait_for(task, timeout=timeout)
    with contextlib.suppress(KafkaError, TimeoutError):
        await asyncio.wait_for(producer.client.close(), timeout=timeout)


def _halved(value: bytes) -> bytes:
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
        self._factory = producer_factory or (lambda: new_producer(settings))
        self._min_retention_ms = min_retention_ms
        self._limit = max_in_flight or settings.max_in_flight
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
        self._producer: AIOKafkaProducer | None = None
        self._linger_s = settings.linger_ms / 1000
        self._partitions: dict[str, list[int]] = {}
        self._partition_of_key: dict[tuple[str, bytes], int] = {}
        self._open: dict[tuple[str, int], _Batch] = {}
        self._full: collections.deque[_Batch] = collections.deque()
        self._busy: collections.Counter[tuple[str, int]] = collections.Counter()
        self._ship_lock = asyncio.Lock()
        self._force = False
        self._last_seq = -1
        self._attempts = itertools.count(1)
        self._inflight: dict[int, _Batch] = {}
        self._failed: dict[int, _Batch] = {}
        self._held: set[tuple[str, int]] = set()  # partitions with batches in _failed
        self._sequence_broken = False
        self._waiting = 0  # events in open, in-flight and failed batches
        self._accepting = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._wake = asyncio.Event()
        self._shipped = asyncio.Event()
        self._trouble = asyncio.Event()
        self._last_ack = time.monotonic()
        self._outage_logged = False
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._published = {topic: metrics.PUBLISHED.labels(topic) for topic in self._topics()}
        self.published = 0
        self.send_failures = 0
        self.dead_lettered = 0
        self.restarts = 0
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
        """Start the producer and the tasks that ship and watch its batches."""
        self._producer = await self._start_producer()
        self._accepting.set()
        self._room.set()
        self._idle.set()
        self._tasks = [
            asyncio.create_task(self._watch(), name="publisher-watchdog"),
            asyncio.create_task(self._shipper(), name="publisher-shipper"),
        ]
        if self._dead is not None:  # the outer publisher: its count includes dead letters
            metrics.PENDING.set_function(lambda: self.pending)

    async def _start_producer(self) -> AIOKafkaProducer:
        producer = self._factory()
        keep_batches_until_a_leader(producer)
        try:
            await asyncio.wait_for(producer.start(), self._settings.request_timeout_ms / 1000)
            for topic in self._topics():
                self._partitions[topic] = sorted(await producer.partitions_for(topic))
        except BaseException:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(producer.stop(), timeout=5)
            raise
        return producer

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
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._producer is not None:
            await _discard(self._producer, timeout=10)
        left = [
            *self._full,
            *self._open.values(),
            *self._inflight.values(),
            *self._failed.values(),
        ]
        lost = 0
        for batch in left:
            metrics.LOST.labels(batch.topic).inc(len(batch.items))
            lost += len(batch.items)
        self.lost += lost
        if lost:
            log.error("publisher closed with %d unacknowledged events (counted failed)", lost)
        self._open.clear()
        self._full.clear()
        self._inflight.clear()
        self._failed.clear()
        self._held.clear()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every event handed over so far is acknowledged by Kafka."""
        async with asyncio.timeout(timeout):
            await self._ship_now()
            await self._idle.wait()
            if self._dead is not None:
                await self._dead.flush()
        if self._fatal is not None:
            raise PublishError("the Kafka producer failed for good") from self._fatal

    async def flush_quietly(self, timeout: float) -> None:
        """Flush on the way out; what is still pending is counted by `close()`."""
        with contextlib.suppress(TimeoutError, PublishError):
            await self.flush(timeout)

    async def probe(self, timeout: float) -> bool:
        """Whether a broker answers a metadata request right now (for readiness)."""
        if self._producer is None or self._closed:
            return False
        try:
            async with asyncio.timeout(timeout):
                await self._producer.client.fetch_all_metadata()
        except (KafkaError, TimeoutError, OSError):
            return False
        return True

    async def barrier(self, timeout: float | None = None) -> None:
        """Wait until every event handed over before this call is acknowledged (checkpoints
        use it: a checkpoint must never claim an event Kafka has not taken)."""
        async with asyncio.timeout(timeout):
            await self._ship_now()
            upto = self._last_seq
            while True:
                if self._fatal is not None:
                    raise PublishError("the Kafka producer failed for good") from self._fatal
                oldest = min(itertools.chain(self._inflight, self._failed), default=upto + 1)
                if oldest > upto:
                    return
                await asyncio.sleep(0.02)

    # -- publishing ------------------------------------------------------------------------

    def topic_for(self, event_type: str) -> str:
        return self._topic_of[event_type]

    async def publish(self, event: Event, received_at: float | None = None) -> None:
        """Validate (unless `event.verified`) and send one event; an invalid event goes to the
        dead-letter topic."""
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
            return
        value = events.serialize(doc)
        await self.send(self._topic_of[event.type], event.key, value, event.headers(), received_at)

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

    async def _too_large(self, topic: str, key: str, value: bytes, headers: Headers) -> None:
        """An event over `kafka.max_record_bytes` (or refused by Kafka as too large): its
        start goes to the dead-letter topic instead, with a warning and a count."""
        names = dict(headers)
        event_type = names.get("event-type", b"").decode() or None
        source = topic
        if value[:1] == b"{":
            with contextlib.suppress(orjson.JSONDecodeError):
                doc = orjson.loads(value)
                if isinstance(doc, dict) and isinstance(doc.get("source"), str):
                    source = doc["source"]
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
            await self._too_large(topic, key, value, headers)
            return
        if self._fatal is not None:
            raise PublishError("the Kafka producer failed for good") from self._fatal
        if self._closed or self._producer is None:
            raise PublishError("the publisher is not running")
        if not self._room.is_set():
            await self._wait_for_room()
        key_bytes = key.encode()
        partition = self._partition_of_key.get((topic, key_bytes))
        if partition is None:
            partition = await self._partition(topic, key_bytes)
        where = (topic, partition)
        while True:
            batch = self._open.get(where) or self._new_batch(topic, partition)
            if batch.builder.append(timestamp=None, key=key_bytes, value=value, headers=headers):
                self._added(batch, (key_bytes, value, headers, received_at))
                return
            del self._open[where]
            if not batch.items:
                raise PublishError(f"a {len(value)}-byte event does not fit in a Kafka batch")
            self._full.append(batch)  # full: the shipper sends it next
            self._wake.set()

    def _added(self, batch: _Batch, item: Item) -> None:
        batch.items.append(item)
        self._waiting += 1
        self._idle.clear()
        if self._waiting >= self._limit:
            self._room.clear()

    def _new_batch(self, topic: str, partition: int) -> _Batch:
        if self._producer is None:
            raise PublishError("the publisher is not running")
        batch = _Batch(topic, partition, self._producer.create_batch())
        self._open[(topic, partition)] = batch
        if not self._busy[(topic, partition)]:
            self._wake.set()  # the shipper starts this batch's linger timer
        return batch

    async def _partition(self, topic: str, key: bytes) -> int:
        """Kafka's default partitioner (murmur2 of the key), cached per key."""
        partitions = self._partitions.get(topic)
        if partitions is None:
            if self._producer is None:
                raise PublishError("the publisher is not running")
            partitions = self._partitions[topic] = sorted(
                await self._producer.partitions_for(topic)
            )
        partition: int = partitions[(int(murmur2(key)) & 0x7FFFFFFF) % len(partitions)]
        if len(self._partition_of_key) < PARTITION_CACHE_MAX:
            self._partition_of_key[(topic, key)] = partition
        return partition

    async def _wait_for_room(self) -> None:
        started = time.monotonic()
        while not self._room.is_set():
            await self._room.wait()
            if self._fatal is not None:
                raise PublishError("the Kafka producer failed for good") from self._fatal
        metrics.BACKPRESSURE.inc(time.monotonic() - started)

    async def _ship_now(self) -> None:
        """Have the shipper send every open batch now, and wait until it has (shipping stays
        in the shipper's task even here, so a cancelled flush strands nothing)."""
        while (self._open or self._full) and self._accepting.is_set() and self._fatal is None:
            self._shipped.clear()
            self._force = True
            self._wake.set()
            await self._shipped.wait()

    async def _shipper(self) -> None:
        """The one task that hands batches to aiokafka (so cancelling a caller never strands a
        batch half-shipped). Full batches go at once; an open batch goes `linger_ms` after its
        first event, or, while its partition has a batch in flight, when that one is
        acknowledged: aiokafka carries one batch per partition per request, so filling the
        next batch meanwhile makes fewer, fuller requests."""
        while True:
            await self._accepting.wait()  # while re-sends run, they ship; open batches wait
            deadline = min(
                (b.created for k, b in self._open.items() if not self._busy[k]), default=None
            )
            timeout = None if deadline is None else deadline + self._linger_s - time.monotonic()
            if timeout is None or timeout > 0:
                # asyncio.timeout, not wait_for: wait_for wraps the wait in a new task, and
                # this runs once or twice per batch
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            self._wake.clear()
            if not self._accepting.is_set():
                continue
            async with self._ship_lock:
                await self._ship_ready(force=self._force)
            self._shipped.set()

    async def _ship_ready(self, *, force: bool) -> None:
        # The due open batches join the full ones in one step: `_ship` may wait (aiokafka
        # holds a partition's next batch until the one before is drained), and meanwhile
        # `send` keeps filling `_open`, moving full batches to `_full` and opening new ones.
        self._force = False
        now = time.monotonic()
        idle = [where for where in self._open if force or not self._busy[where]]
        if force or any(now - self._open[where].created >= self._linger_s for where in idle):
            # Once one batch is due the other idle ones go along, as the Java client drains
            # every partition of a broker once one is ready: one request rather than one per
            # partition, and none of their events waits longer than the oldest one's linger.
            self._full.extend(self._open.pop(where) for where in idle)
        while self._full:
            await self._ship(self._full.popleft())

    async def _ship(self, batch: _Batch) -> None:
        self._last_seq = seq = self._last_seq + 1
        batch.attempt = attempt = next(self._attempts)
        self._inflight[seq] = batch
        self._busy[(batch.topic, batch.partition)] += 1
        if self._producer is None:
            self._fail(seq, attempt, PublishError("no producer"))
            return
        if (batch.topic, batch.partition) in self._held:
            # An older batch of this partition waits to be re-sent: handing this one to
            # aiokafka now could write it first. It is re-sent after that one, in order.
            self._fail(seq, attempt, None)
            return
        batch.builder.close()  # a closed batch is sent at once: we lingered already
        try:
            future = await self._producer.send_batch(
                batch.builder, batch.topic, partition=batch.partition
            )
        except (KafkaError, PublishError) as exc:
            self._fail(seq, attempt, exc)
            return
        future.add_done_callback(partial(self._on_done, seq, attempt))

    def _on_done(self, seq: int, attempt: int, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._fail(seq, attempt, exc)
            return
        batch = self._inflight.get(seq)
        if batch is None or batch.attempt != attempt:
            return  # an attempt from a producer that was replaced
        del self._inflight[seq]
        self._idle_partition(batch)
        now = time.monotonic()
        self._last_ack = now
        self._outage_logged = False
        count = len(batch.items)
        self.published += count
        self._published[batch.topic].inc(count)
        metrics.LATENCY.observe_since(now, map(_received_at, batch.items))
        self._waiting -= count
        self._settled()

    def _fail(self, seq: int, attempt: int, exc: BaseException | None) -> None:
        """Move a batch to the ones to re-send; `exc` None: held back, never sent."""
        batch = self._inflight.get(seq)
        if batch is None or batch.attempt != attempt:
            return
        del self._inflight[seq]
        self._idle_partition(batch)
        self._failed[seq] = batch
        self._held.add((batch.topic, batch.partition))
        if exc is None:
            return
        log.debug("a batch of %d events to %s failed: %r", len(batch.items), batch.topic, exc)
        self.send_failures += 1
        metrics.SEND_FAILED.labels(batch.topic).inc(len(batch.items))
        self._last_error = exc
        if isinstance(exc, SEQUENCE_ERRORS):
            self._sequence_broken = True
        elif isinstance(exc, MessageSizeTooLargeError):
            batch.too_large = True
        self._trouble.set()

    def _idle_partition(self, batch: _Batch) -> None:
        where = (batch.topic, batch.partition)
        self._busy[where] -= 1
        if self._busy[where] <= 0:
            del self._busy[where]
            if where in self._open:
                self._wake.set()  # its next batch has been filling meanwhile

    def _settled(self) -> None:
        if not self._waiting:
            self._idle.set()
        if self._accepting.is_set() and self._waiting < self._limit:
            self._room.set()

    # -- recovery --------------------------------------------------------------------------

    def _sender_dead(self) -> bool:
        # aiokafka#1017: after OutOfOrderSequenceNumber the sender task ends and the producer
        # accepts sends it will never deliver. Its task is the only sign.
        task = None if self._producer is None else sender_task(self._producer)
        return task is not None and task.done()

    def _stalled(self) -> bool:
        return bool(self._inflight) and (
            time.monotonic() - self._last_ack > self._settings.stall_timeout_s
        )

    async def _watch(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._trouble.wait(), WATCH_INTERVAL_S)
            self._trouble.clear()
            try:
                if self._sender_dead():
                    await self._rebuild("sender_died")
                elif self._stalled():
                    if await self._unreachable():
                        self._last_ack = time.monotonic()  # an outage is not a stall
                    else:
                        await self._rebuild("stalled")
                elif self._failed:
                    await self._resend_failed()
            except (KafkaError, PublishError) as exc:
                log.error("Kafka producer cannot be rebuilt, giving up: %s", exc)  # noqa: TRY400
                self._fatal = exc
                self._room.set()
                self._idle.set()
                return

    async def _quiesce(self) -> None:
        """Stop taking new sends and let the in-flight ones settle, so re-sends keep order."""
        self._accepting.clear()
        self._room.clear()
        deadline = time.monotonic() + self._settings.request_timeout_ms / 1000 + 5
        # Polls: it watches a deadline and the sender task as well as the in-flight set.
        while self._inflight and time.monotonic() < deadline and not self._sender_dead():  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def _unreachable(self) -> bool:
        """No broker answers: an outage the producer rides out, not a producer to replace."""
        if await self.probe(timeout=PROBE_TIMEOUT_S):
            return False
        if not self._outage_logged:
            log.warning(
                "Kafka does not answer; %d events wait for it (retried with their sequence "
                "numbers, so nothing is written twice)",
                self._waiting,
            )
            self._outage_logged = True
        return True

    async def _resend_failed(self) -> None:
        await self._quiesce()
        while self._inflight and not self._sender_dead() and await self._unreachable():
            await self._quiesce()  # in-flight batches are retried as they are: wait for them
        if self._sender_dead() or self._inflight:
            await self._rebuild("sender_died" if self._sender_dead() else "stalled")
            return
        if self._sequence_broken:
            # The broker refused a sequence number: every later batch of that partition
            # would be refused too, until a new producer id starts the sequences afresh.
            await self._rebuild("sequence")
            return
        log.warning(
            "re-sending %d batches Kafka did not acknowledge: %s",
            len(self._failed),
            self._last_error,
        )
        await asyncio.sleep(min(1.0, self._settings.request_timeout_ms / 1000))
        await self._replay_failed()

    async def _rebuild(self, reason: str) -> None:
        self._accepting.clear()
        self._room.clear()
        log.error("rebuilding the Kafka producer (%s): %s", reason, self._last_error)
        metrics.PRODUCER_RESTARTS.labels(reason).inc()
        self.restarts += 1
        old, self._producer = self._producer, None
        if old is not None:
            await _discard(old, timeout=5)
        # Whatever the old producer had not confirmed is re-sent by the new one.
        self._failed.update(self._inflight)
        self._inflight.clear()
        self._busy.clear()
        self._sequence_broken = False
        delays = itertools.chain(REBUILD_BACKOFF_S, itertools.repeat(REBUILD_BACKOFF_S[-1]))
        for attempt, backoff in enumerate(delays):
            try:
                self._producer = await self._start_producer()
                break
            except (KafkaError, TimeoutError) as exc:
                if not getattr(exc, "retriable", True) or attempt > 60:
                    raise PublishError(f"cannot start a Kafka producer: {exc}") from exc
                log.warning("Kafka producer start failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
        self._last_ack = time.monotonic()
        await self._replay_failed()

    async def _replay_failed(self) -> None:
        """Re-send failed batches in their original order, then the open ones, then resume."""
        if self._producer is None:
            raise PublishError("no producer")
        async with self._ship_lock:
            await self._resend([batch for _, batch in sorted(self._failed.items())])
        self._accepting.set()
        self._settled()
        self._wake.set()

    async def _resend(self, failed: list[_Batch]) -> None:
        if self._producer is None:
            raise PublishError("no producer")
        self._failed.clear()
        self._held.clear()
        reopened = [*self._full, *self._open.values()]
        self._full.clear()
        self._open.clear()
        for old in [*failed, *reopened]:
            if old.too_large:
                await self._split(old)
                continue
            batch = _Batch(old.topic, old.partition, self._producer.create_batch())
            for item in old.items:
                key, value, headers, _ = item
                if not batch.builder.append(timestamp=None, key=key, value=value, headers=headers):
                    await self._ship(batch)
                    batch = _Batch(old.topic, old.partition, self._producer.create_batch())
                    batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
                batch.items.append(item)
            await self._ship(batch)

    async def _split(self, refused: _Batch) -> None:
        """Re-send a batch Kafka refused as too large (MESSAGE_TOO_LARGE) in two halves; a
        single event is dead-lettered, a single dead letter is cut to half its size."""
        if self._producer is None:
            raise PublishError("no producer")
        items = refused.items
        if len(items) == 1:
            key, value, headers, received_at = items[0]
            if self._dead is not None:
                self._waiting -= 1
                await self._too_large(refused.topic, key.decode(), value, headers)
                return
            items = [(key, _halved(value), headers, received_at)]
        halves = (
            [items] if len(items) == 1 else [items[: len(items) // 2], items[len(items) // 2 :]]
        )
        for part in halves:
            batch = _Batch(refused.topic, refused.partition, self._producer.create_batch())
            for item in part:
                key, value, headers, _ = item
                batch.builder.append(timestamp=None, key=key, value=value, headers=headers)
                batch.items.append(item)
            await self._ship(batch)

    # -- introspection ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events (and dead letters) handed to the publisher and not yet acknowledged."""
        return self._waiting + (self._dead.pending if self._dead is not None else 0)

    @property
    def dead_letter_trouble(self) -> str | None:
        """Why dead letters are not reaching Kafka (for readiness), or None if they are."""
        dead = self._dead
        if dead is None or not dead._waiting:
            return None
        batches = [*dead._inflight.values(), *dead._failed.values()]
        oldest = min((b.created for b in batches), default=time.monotonic())
        if not dead._failed and time.monotonic() - oldest < DLQ_STUCK_S:
            return None
        error = dead._last_error
        why = f"{type(error).__name__}" if error is not None else "no acknowledgement"
        return f"{dead._waiting} dead letters wait for topic {self._settings.topics.dlq} ({why})"

    @property
    def producer_id(self) -> int | None:
        """The idempotent producer id the broker assigned (None before it has one)."""
        return None if self._producer is None else producer_id(self._producer)

    @property
    def healthy(self) -> bool:
        return self._fatal is None and not self._closed and self._accepting.is_set()
