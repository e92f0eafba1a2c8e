"""The Kafka publisher: validated events in, acknowledged records out, nothing lost silently.

Every send is tracked until Kafka acknowledges it. A send that fails is kept and re-sent in
its original order once the in-flight sends have settled; if the producer itself is broken
(its sender task died, e.g. after `OutOfOrderSequenceNumber`, aiokafka#1017, or no send has
been acknowledged for `stall_timeout_s` while some are pending) it is rebuilt first. The
window of unacknowledged events is bounded (`max_in_flight`): when Kafka is slow, `publish`
waits, and so do the sources that call it. That wait is the backpressure that reaches the
upstream sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from bridge import events, metrics
from bridge.config import KafkaSettings
from bridge.errors import PublishError
from bridge.events import Event, Headers
from bridge.kafka import ensure_topics, producer_kwargs

log = logging.getLogger(__name__)

ProducerFactory = Callable[[], AIOKafkaProducer]
WATCH_INTERVAL_S = 1.0
REBUILD_BACKOFF_S = (0.5, 1.0, 2.0, 5.0, 10.0)


@dataclass(slots=True)
class _Pending:
    topic: str
    key: bytes
    value: bytes
    headers: Headers
    received_at: float | None
    attempt: int = 0


class Publisher:
    """Publishes events to the topic of their type, keyed by symbol.

    Use as `async with Publisher(settings) as pub: await pub.publish(event)`.
    """

    def __init__(
        self, settings: KafkaSettings, *, producer_factory: ProducerFactory | None = None
    ) -> None:
        self._settings = settings
        self._factory = producer_factory or (lambda: AIOKafkaProducer(**producer_kwargs(settings)))
        topics = settings.topics
        self._topic_of = {
            events.NAV_TICK: topics.nav_ticks,
            events.VWAP_TICK: topics.vwap_ticks,
            events.GAP: topics.vwap_ticks,
            events.SETTLEMENT: topics.settlements,
            events.DEAD_LETTER: topics.dlq,
        }
        self._producer: AIOKafkaProducer | None = None
        self._last_seq = -1
        self._attempts = itertools.count(1)
        self._inflight: dict[int, _Pending] = {}
        self._failed: dict[int, _Pending] = {}
        self._accepting = asyncio.Event()
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._trouble = asyncio.Event()
        self._last_ack = time.monotonic()
        self._last_error: BaseException | None = None
        self._fatal: BaseException | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._closed = False
        self._published = {topic: metrics.PUBLISHED.labels(topic) for topic in self._topics()}
        self.published = 0
        self.send_failures = 0
        self.dead_lettered = 0
        self.restarts = 0

    def _topics(self) -> set[str]:
        return {*self._topic_of.values(), self._settings.topics.state}

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._settings.create_topics:
            await ensure_topics(self._settings)
        self._producer = self._factory()
        try:
            await self._producer.start()
        except BaseException:
            await self._producer.stop()
            raise
        self._accepting.set()
        self._room.set()
        self._idle.set()
        self._watchdog = asyncio.create_task(self._watch(), name="publisher-watchdog")
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
        with contextlib.suppress(TimeoutError, PublishError):
            await self.flush(timeout)
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        if self._producer is not None:
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(self._producer.stop(), timeout=10)
        left = [*self._inflight.values(), *self._failed.values()]
        for pending in left:
            metrics.LOST.labels(pending.topic).inc()
        if left:
            log.error(
                "publisher closed with %d unacknowledged events (counted as failed)", len(left)
            )
        self._inflight.clear()
        self._failed.clear()

    async def flush(self, timeout: float | None = None) -> None:
        """Wait until every event sent so far is acknowledged by Kafka."""
        if self._fatal is not None:
            raise PublishError("the Kafka producer failed for good") from self._fatal
        await asyncio.wait_for(self._idle.wait(), timeout)

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
        """Wait until every event sent before this call is acknowledged (checkpoints use it:
        a checkpoint must never claim an event Kafka has not taken)."""
        upto = self._last_seq
        async with asyncio.timeout(timeout):
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
        """Validate and send one event; an invalid event goes to the dead-letter topic."""
        problem = event.validation_error()
        if problem is not None:
            await self.dead_letter(
                source=event.source,
                raw=event.to_json(),
                reason="schema_violation",
                detail=problem,
                key=event.key,
                event_type=event.type,
            )
            return
        await self.send(
            self._topic_of[event.type], event.key, event.to_json(), event.headers(), received_at
        )

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
        """Send bad input to the dead-letter topic with its reason, and count it."""
        metrics.DEAD_LETTERS.labels(source, reason).inc()
        self.dead_lettered += 1
        record = events.dead_letter(
            source=source, raw=raw, reason=reason, detail=detail, key=key, event_type=event_type
        )
        await self.send(
            self._topic_of[events.DEAD_LETTER], record.key, record.to_json(), record.headers()
        )

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes,
        headers: Headers,
        received_at: float | None = None,
    ) -> None:
        """Queue pre-serialized bytes; returns once Kafka's client has taken them.

        Waits while the producer is being rebuilt or `max_in_flight` events are unacknowledged.
        """
        if self._fatal is not None:
            raise PublishError("the Kafka producer failed for good") from self._fatal
        if self._closed:
            raise PublishError("the publisher is closed")
        if not self._room.is_set():
            await self._wait_for_room()
        self._last_seq = seq = self._last_seq + 1
        pending = _Pending(topic, key.encode(), value, headers, received_at)
        self._inflight[seq] = pending
        self._idle.clear()
        if len(self._inflight) + len(self._failed) >= self._settings.max_in_flight:
            self._room.clear()
        await self._send(seq, pending)

    async def _wait_for_room(self) -> None:
        started = time.monotonic()
        while not self._room.is_set():
            await self._room.wait()
            if self._fatal is not None:
                raise PublishError("the Kafka producer failed for good") from self._fatal
        metrics.BACKPRESSURE.inc(time.monotonic() - started)

    async def _send(self, seq: int, pending: _Pending) -> None:
        if self._producer is None:
            raise PublishError("start() the publisher first")
        pending.attempt = attempt = next(self._attempts)
        try:
            future = await self._producer.send(
                pending.topic, pending.value, key=pending.key, headers=pending.headers
            )
        except KafkaError as exc:
            self._fail(seq, attempt, exc)
            return
        future.add_done_callback(partial(self._on_done, seq, attempt))

    def _on_done(self, seq: int, attempt: int, future: asyncio.Future[Any]) -> None:
        exc = future.exception() if not future.cancelled() else asyncio.CancelledError()
        if exc is not None:
            self._fail(seq, attempt, exc)
            return
        pending = self._inflight.get(seq)
        if pending is None or pending.attempt != attempt:
            return  # an attempt from a producer that was replaced
        del self._inflight[seq]
        now = time.monotonic()
        self._last_ack = now
        self.published += 1
        self._published[pending.topic].inc()
        if pending.received_at is not None:
            metrics.LATENCY.observe(now - pending.received_at)
        self._settled()

    def _fail(self, seq: int, attempt: int, exc: BaseException) -> None:
        pending = self._inflight.get(seq)
        if pending is None or pending.attempt != attempt:
            return
        del self._inflight[seq]
        self._failed[seq] = pending
        self.send_failures += 1
        metrics.SEND_FAILED.labels(pending.topic).inc()
        self._last_error = exc
        self._trouble.set()
        self._settled()

    def _settled(self) -> None:
        if not self._inflight and not self._failed:
            self._idle.set()
        if (
            self._accepting.is_set()
            and len(self._inflight) + len(self._failed) < self._settings.max_in_flight
        ):
            self._room.set()

    # -- recovery --------------------------------------------------------------------------

    def _sender_dead(self) -> bool:
        # aiokafka#1017: after OutOfOrderSequenceNumber the sender task ends and the producer
        # accepts sends it will never deliver. Its task is the only sign.
        sender = getattr(self._producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
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

    async def _resend_failed(self) -> None:
        await self._quiesce()
        if self._sender_dead() or self._inflight:
            await self._rebuild("sender_died" if self._sender_dead() else "stalled")
            return
        log.warning(
            "re-sending %d events Kafka did not acknowledge: %s",
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
            with contextlib.suppress(KafkaError, TimeoutError):
                await asyncio.wait_for(old.stop(), timeout=5)
        # Whatever the old producer had not confirmed is re-sent by the new one.
        self._failed.update(self._inflight)
        self._inflight.clear()
        for attempt, backoff in enumerate(
            itertools.chain(REBUILD_BACKOFF_S, itertools.repeat(10.0))
        ):
            producer = self._factory()
            try:
                await asyncio.wait_for(
                    producer.start(), timeout=self._settings.request_timeout_ms / 1000
                )
            except (KafkaError, TimeoutError) as exc:
                with contextlib.suppress(KafkaError, TimeoutError):
                    await asyncio.wait_for(producer.stop(), timeout=5)
                if not getattr(exc, "retriable", True) or attempt > 60:
                    raise PublishError(f"cannot start a Kafka producer: {exc}") from exc
                log.warning("Kafka producer start failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                continue
            self._producer = producer
            break
        self._last_ack = time.monotonic()
        await self._replay_failed()

    async def _replay_failed(self) -> None:
        failed = sorted(self._failed.items())
        self._failed.clear()
        for seq, pending in failed:
            self._inflight[seq] = pending
        for seq, pending in failed:
            await self._send(seq, pending)
        self._accepting.set()
        self._settled()

    # -- introspection ---------------------------------------------------------------------

    @property
    def pending(self) -> int:
        """Events handed to the publisher and not yet acknowledged."""
        return len(self._inflight) + len(self._failed)

    @property
    def producer_id(self) -> int | None:
        """The idempotent producer id the broker assigned (None before it has one)."""
        manager = getattr(self._producer, "_txn_manager", None)
        pid = getattr(manager, "producer_id", None)
        return pid if isinstance(pid, int) and pid >= 0 else None

    @property
    def healthy(self) -> bool:
        return self._fatal is None and not self._closed and self._accepting.is_set()
