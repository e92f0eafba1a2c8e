"""Events and the checkpoints that say they were published, written in one Kafka transaction:
all of them or none. The producer's `transactional.id` fences an older instance; a fenced
one raises `PublishError` and must stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import ProducerFenced

from bridge import metrics
from bridge.config import KafkaSettings
from bridge.errors import PublishError
from bridge.events import DEAD_LETTER, Event
from bridge.kafka import ensure_topics, new_producer
from bridge.publish import discard
from bridge.state import STATE_HEADERS, read_latest
from bridge.tasks import observed

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


class TransactionSink(Protocol):
    """Where the settlement poller commits: its own `Transactions`, or its shard's."""

    async def start(self, topics: Sequence[str]) -> None: ...

    async def read_checkpoints(self, keys: Sequence[str]) -> dict[str, bytes | None]: ...

    async def close(self) -> None: ...

    async def commit(
        self, events: Sequence[tuple[str, Event]], checkpoints: Sequence[tuple[str, bytes]]
    ) -> None: ...


class Transactions:
    """One transactional producer (`transactional_id`) for the source `name`: `start()`,
    `read_checkpoints()`, then `commit()` once per unit of work."""

    def __init__(self, kafka: KafkaSettings, transactional_id: str, *, name: str) -> None:
        self._kafka = kafka
        self._transactional_id = transactional_id
        self._name = name
        topics = kafka.topics
        self._topic_of = {DEAD_LETTER: topics.dlq}
        self._producer: AIOKafkaProducer | None = None

    @property
    def started(self) -> bool:
        return self._producer is not None

    async def start(self, topics: Sequence[str]) -> None:
        """Create `topics` (and the dead-letter and state topics) if configured to, then
        start the producer: its start fences an older instance and aborts that one's open
        transaction, so no half-written unit is pending when checkpoints are read."""
        if self._producer is not None:
            return
        kafka = self._kafka
        if kafka.create_topics:
            await ensure_topics(kafka, [*topics, kafka.topics.dlq, kafka.topics.state])
        producer = new_producer(kafka, transactional_id=self._transactional_id)
        try:
            await producer.start()
        except BaseException:
            await discard(producer, STOP_TIMEOUT_S)
            raise
        self._producer = producer

    async def read_checkpoints(self, keys: Sequence[str]) -> dict[str, bytes | None]:
        """The latest value of each of `keys` in the state topic (None: deleted)."""
        return await read_latest(self._kafka, list(keys))

    async def close(self) -> None:
        """Stop the producer; safe to call twice, and `start` may follow. A fenced producer
        leaves its error on futures nobody awaits: `discard` marks them seen."""
        producer, self._producer = self._producer, None
        if producer is not None:
            await discard(producer, STOP_TIMEOUT_S)

    async def commit(
        self, events: Sequence[tuple[str, Event]], checkpoints: Sequence[tuple[str, bytes]]
    ) -> None:
        """Send `events` (topic, event: dead letters go to the dead-letter topic whatever the
        topic given) and `checkpoints` (state key, value) in one transaction, and commit.

        On any failure the producer is closed (the outcome may be unknown: a commit can fail
        after the broker applied it), so the caller must re-read its checkpoints after a new
        `start()`."""
        producer = self._producer
        if producer is None:
            raise RuntimeError(f"{self._name}: the transactional producer is not started")
        state = self._kafka.topics.state
        try:
            await producer.begin_transaction()
            sent: list[asyncio.Future[Any]] = []
            for topic, event in events:
                target = self._topic_of.get(event.type, topic)
                sent.append(  # observed: a later send may raise before they are awaited
                    observed(
                        await producer.send(
                            target, event.to_json(), key=event.key.encode(), headers=event.headers()
                        )
                    )
                )
            for key, value in checkpoints:
                sent.append(
                    observed(
                        await producer.send(state, value, key=key.encode(), headers=STATE_HEADERS)
                    )
                )
            await _acknowledged(sent)
            await producer.commit_transaction()
        except ProducerFenced as exc:
            await self.close()
            log.error(  # noqa: TRY400 - one clear line; the cause is known
                "%s: fenced: another instance runs with transactional_id %r; this one stops",
                self._name,
                self._transactional_id,
            )
            raise PublishError(
                f"{self._name}: fenced by another instance with transactional_id "
                f"{self._transactional_id!r}"
            ) from exc
        except BaseException:
            await self._abort(producer)
            await self.close()
            raise
        self._count(events)

    @staticmethod
    async def _abort(producer: AIOKafkaProducer) -> None:
        """Best effort: the producer is closed anyway, and the next start aborts whatever is
        left open."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ABORT_TIMEOUT_S):
                await producer.abort_transaction()

    def _count(self, events: Sequence[tuple[str, Event]]) -> None:
        published: dict[str, int] = {}
        for topic, event in events:
            target = self._topic_of.get(event.type, topic)
            published[target] = published.get(target, 0) + 1
            if event.type == DEAD_LETTER:
                metrics.DEAD_LETTERS.labels(event.data["source"], event.data["reason"]).inc()
        for topic, count in published.items():
            metrics.PUBLISHED.labels(topic).inc(count)


async def _acknowledged(sent: Sequence[asyncio.Future[Any]]) -> None:
    """Wait for every send of a transaction; raise the first failure (all are read, so no
    failed future is left unobserved)."""
    for outcome in await asyncio.gather(*sent, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
