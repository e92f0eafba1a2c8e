"""One shard's events, published in Kafka transactions under the shard's `transactional.id`.

Starting the producer fences any older one with that id and aborts its open transaction, so
a stale owner's next commit fails (`Fenced`) and readers with `read_committed` see each
event once. Sends append to the batches of the next transaction; one task commits them as
soon as the last commit ended (or `kafka.commit_interval_ms` after it began): why that
cadence, see docs/design.md, "Shards and fencing".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    InvalidProducerEpoch,
    KafkaError,
    MessageSizeTooLargeError,
    ProducerFenced,
    TransactionalIdAuthorizationFailed,
)
from aiokafka.producer.message_accumulator import BatchBuilder

from bridge import aiokafka_internals, events, metrics
from bridge.backoff import KAFKA_CAP_S, Backoff
from bridge.config import KafkaSettings
from bridge.errors import PublishError
from bridge.events import Event, Headers
from bridge.kafka import new_producer
from bridge.publish._in_doubt import Written, was_committed
from bridge.publish._recovery import discard
from bridge.publish._txn import Item, Txn, Where
from bridge.publish.publisher import Publisher
from bridge.state import STATE_HEADERS
from bridge.tasks import cancel_and_wait, observed

log = logging.getLogger(__name__)

FENCED = (ProducerFenced, InvalidProducerEpoch, TransactionalIdAuthorizationFailed)
ProducerFactory = Callable[[str], AIOKafkaProducer]


class Fenced(PublishError):  # noqa: N818 - the broker's word for it
    """Another instance started with this `transactional.id`: this one no longer owns it."""


class ShardPublisher:
    """Publishes one shard's events and checkpoints, a transaction at a time.

    `send` and `publish` return once the event is in the next transaction (they wait while
    `kafka.max_in_flight` are uncommitted); `flush` waits until all handed over so far are
    committed. Dead letters leave through `dead`, a shared idempotent publisher, so a
    dead-letter topic that cannot be written never holds up a commit.
    """

    def __init__(
        self,
        settings: KafkaSettings,
        transactional_id: str,
        *,
        dead: Publisher,
        factory: ProducerFactory | None = None,
    ) -> None:
        self._settings = settings
        self.transactional_id = transactional_id
        self._dead = dead
        self.dead_letter = dead.dead_letter  # bad input leaves through the shared publisher
        self._factory = factory or (lambda tid: new_producer(settings, transactional_id=tid))
        self._interval_s = settings.commit_interval_ms / 1000
        self._limit = settings.max_in_flight
        self._producer: AIOKafkaProducer | None = None
        self._builders: AIOKafkaProducer | None = None  # makes batches, even while rebuilding
        self._next = Txn()
        self._committing = Txn()
        self._handed = 0  # events appended since start
        self._committed = 0  # of those, events committed (or dead-lettered as too large)
        self._progress = asyncio.Condition()
        self._checkpoint: Callable[[], Awaitable[None]] = self.flush
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._partition_of: dict[tuple[str, bytes], Where] = {}
        self.commits = 0
        self.rebuilds = 0
        self.published = 0  # records committed, checkpoints included

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> ShardPublisher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def start(self) -> None:
        """Start the producer (fencing any older instance of this shard) and the committer."""
        try:
            self._producer = await self._new_producer()
        except FENCED as exc:
            raise Fenced(f"{self.transactional_id}: fenced at start") from exc
        self._builders = self._producer
        self._task = asyncio.create_task(self._commit_forever(), name=self.transactional_id)

    async def _new_producer(self) -> AIOKafkaProducer:
        aiokafka_internals.retry_transactions_sooner()
        producer = self._factory(self.transactional_id)
        try:
            await producer.start()
        except BaseException:
            await discard(producer, timeout=5)
            raise
        return producer

    async def close(self, timeout: float = 30.0) -> int:
        """Commit what is pending (up to `timeout`), then stop; returns how many events were
        not committed (logged and counted lost, unless fenced: then they belong to the new
        owner, which back-fills them)."""
        with contextlib.suppress(TimeoutError, PublishError):
            await self.flush(timeout)
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        await self._drop_producer()
        left = self._handed - self._committed
        if left and not self.fenced:
            log.error("%s: closed with %d events not committed", self.transactional_id, left)
            for txn in (self._committing, self._next):
                for topic, count in txn.per_topic().items():
                    metrics.LOST.labels(topic).inc(count)
        async with self._progress:
            self._progress.notify_all()
        return left

    @property
    def fenced(self) -> bool:
        return isinstance(self._failure, Fenced)

    @property
    def healthy(self) -> bool:
        return self._failure is None and self._task is not None and not self._task.done()

    async def watch(self) -> None:
        """Wait while the committer runs; raise what stopped it (`Fenced`), so that a shard
        whose sources are idle learns it was fenced all the same."""
        if self._task is not None:
            await asyncio.wait([self._task])
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._task is None:
            raise PublishError(f"{self.transactional_id}: not running")

    def checkpoints_with(self, checkpoint: Callable[[], Awaitable[None]]) -> None:
        """How `persist_marks` commits the shard's marks (its host's checkpoint)."""
        self._checkpoint = checkpoint

    async def persist_marks(self) -> None:
        """Commit the shard's marks now: an event sent before them could still be aborted
        with its transaction, and the next holder would not know where it began."""
        await self._checkpoint()

    # -- handing over ----------------------------------------------------------------------

    def topic_for(self, event_type: str) -> str:
        return self._dead.topic_for(event_type)

    async def publish(self, event: Event, received_at: float | None = None) -> None:
        """Validate (unless `event.verified`) and send one event; an invalid one is a dead
        letter."""
        value = await self._dead.encoded(event)
        if value is not None:
            await self.send(
                self.topic_for(event.type), event.key, value, event.headers(), received_at
            )

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes,
        headers: Headers,
        received_at: float | None = None,
    ) -> None:
        """Hand over pre-serialized bytes for the next transaction; a value over
        `kafka.max_record_bytes` is dead-lettered instead (`too_large`)."""
        if len(value) > self._settings.max_record_bytes:
            await self._dead.too_large(topic, key, value, headers)
            return
        if self._failure is not None or self._task is None:
            self._raise_if_failed()
        if self._handed - self._committed >= self._limit:
            await self._wait_for_room()
        key_bytes = key.encode()
        where = self._partition_of.get((topic, key_bytes))
        if where is None:
            where = await self._where(topic, key_bytes)
        self._add(where, (key_bytes, value, headers, received_at))

    def _add(self, where: Where, item: Item) -> None:
        self._next.add(where, item, self._new_batch)
        self._handed += 1
        if not self._wake.is_set():
            self._wake.set()

    def _new_batch(self) -> BatchBuilder:
        if self._builders is None:
            raise PublishError(f"{self.transactional_id}: not running")
        return self._builders.create_batch()

    async def commit(
        self, batch: Sequence[tuple[str, Event]], checkpoints: Sequence[tuple[str, bytes]]
    ) -> None:
        """Publish `batch` (topic, event) and write `checkpoints` (state key, value) in one
        transaction, and wait until it is committed (dead letters go to `dead` first)."""
        self._raise_if_failed()
        items: list[tuple[Where, Item]] = []
        for topic, event in batch:
            if event.type == events.DEAD_LETTER:
                await self._dead.send(
                    self.topic_for(events.DEAD_LETTER), event.key, event.to_json(), event.headers()
                )
                metrics.DEAD_LETTERS.labels(event.data["source"], event.data["reason"]).inc()
                continue
            key = event.key.encode()
            where = await self._where(topic, key)
            items.append((where, (key, event.to_json(), event.headers(), None)))
        state = self._settings.topics.state
        for key_text, value in checkpoints:
            key = key_text.encode()
            items.append((await self._where(state, key), (key, value, STATE_HEADERS, None)))
        for where, item in items:  # no await between them: they share one transaction
            self._add(where, item)
        await self.flush()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every event handed over so far is committed."""
        upto = self._handed
        async with asyncio.timeout(timeout), self._progress:
            await self._progress.wait_for(lambda: self._committed >= upto or self._stopped())
        self._raise_if_failed()

    def _stopped(self) -> bool:
        return self._failure is not None or self._task is None or self._task.done()

    async def _wait_for_room(self) -> None:
        started = time.monotonic()
        async with self._progress:
            await self._progress.wait_for(
                lambda: self._handed - self._committed < self._limit or self._stopped()
            )
        self._raise_if_failed()
        metrics.BACKPRESSURE.inc(time.monotonic() - started)

    async def _where(self, topic: str, key: bytes) -> Where:
        """The topic-partition of `key`, by the shared publisher's partitioner (cached)."""
        where = (topic, await self._dead.partition_of(topic, key.decode()))
        if len(self._partition_of) < 100_000:
            self._partition_of[(topic, key)] = where
        return where

    # -- committing ------------------------------------------------------------------------

    async def _commit_forever(self) -> None:
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                if not self._next.count:
                    continue
                self._committing, self._next = self._next, Txn()
                began = time.monotonic()
                await self._commit(self._committing)
                done, self._committing = self._committing, Txn()
                async with self._progress:
                    self._committed += done.count + done.dropped
                    self._progress.notify_all()
                self._count(done)
                rest = self._interval_s - (time.monotonic() - began)
                if rest > 0:
                    await asyncio.sleep(rest)
        except PublishError as exc:
            self._failure = exc
            async with self._progress:
                self._progress.notify_all()
            raise

    async def _commit(self, txn: Txn) -> None:
        """Commit `txn`, retrying on a new producer until it is committed.

        Any failure before the commit returns is handled by a rebuild: the new producer's
        start bumps the epoch and ends the open transaction, so no batch still in flight
        from the old one can be written after it (re-sent, it would be written twice). That
        start aborts a transaction whose commit was not asked for; one whose commit was asked
        for may have been committed, and is read back before it is sent again.
        """
        backoff = Backoff(cap=KAFKA_CAP_S)
        while True:
            producer = self._producer
            try:
                if producer is None:
                    producer = self._producer = await self._new_producer()
                    self._builders = producer
                    self.rebuilds += 1
                    doubt = txn.in_doubt
                    if doubt is not None and await self._committed_after_all(doubt, txn.count):
                        self.commits += 1
                        return
                    txn.in_doubt = None
                    txn.rebuild(self._new_batch)
                if await self._transact(producer, txn):
                    self.commits += 1
                    return
                await self._drop_producer()  # aborts it: nothing of it was committed
                for (topic, _), (key, value, headers, _) in txn.split_refused():
                    await self._dead.too_large(topic, key.decode(), value, headers)
            except (KafkaError, OSError, TimeoutError) as exc:
                if isinstance(exc, FENCED) or aiokafka_internals.coordinator_failed(exc):
                    # So does a commit the coordinator failed as it raced the fence: sent
                    # again on a new producer, it would fence whoever took over.
                    log.error(  # noqa: TRY400 - one clear line; the cause is known
                        "%s: fenced (%s): another instance took this shard over",
                        self.transactional_id,
                        type(exc.__cause__ or exc).__name__,
                    )
                    metrics.FENCED.labels(self.transactional_id).inc()
                    await self._drop_producer()
                    raise Fenced(f"{self.transactional_id}: fenced by a newer instance") from exc
                delay = backoff.next_delay()
                log.warning(
                    "%s: transaction failed (%s: %s); retrying on a new producer in %.1fs",
                    self.transactional_id,
                    type(exc).__name__,
                    exc,
                    delay,
                )
                await self._drop_producer()
                await asyncio.sleep(delay)

    @staticmethod
    async def _transact(producer: AIOKafkaProducer, txn: Txn) -> bool:
        """One attempt: True once committed, False if Kafka refused a batch as too large
        (`txn` knows which); raises on any other failure."""
        await producer.begin_transaction()
        sent = []
        for batch in txn.batches():
            batch.builder.close()  # complete: aiokafka would hold an open one `linger_ms`
            topic, partition = batch.where
            future = await producer.send_batch(batch.builder, topic, partition=partition)
            sent.append((batch, observed(future)))  # a later send may raise first
        outcomes = await asyncio.gather(*(future for _, future in sent), return_exceptions=True)
        for (batch, _), outcome in zip(sent, outcomes, strict=True):
            batch.refused = isinstance(outcome, MessageSizeTooLargeError)
        if any(batch.refused for batch, _ in sent):
            return False  # later batches of its partition fail too (out of sequence)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        if outcomes and not isinstance(first := outcomes[0], BaseException):
            txn.in_doubt = (first.topic, first.partition, first.offset)
        await producer.commit_transaction()
        return True

    async def _committed_after_all(self, written: Written, count: int) -> bool:
        """Whether the transaction whose commit failed (its first batch at `written`) was
        committed all the same."""
        timeout = self._settings.request_timeout_ms / 1000
        if not await was_committed(self._settings, written, timeout):
            return False
        log.warning(
            "%s: a commit that failed had reached Kafka: its %d events are not sent again",
            self.transactional_id,
            count,
        )
        return True

    async def _drop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await discard(producer, timeout=5)

    def _count(self, txn: Txn) -> None:
        state = self._settings.topics.state
        for topic, count in txn.per_topic().items():
            self.published += count
            if topic != state:
                metrics.PUBLISHED.labels(topic).inc(count)
        now = time.monotonic()
        for batch in txn.batches():
            metrics.LATENCY.observe_since(now, (item[3] for item in batch.items))
        metrics.COMMITS.labels(self.transactional_id).inc()
