"""The shards this replica holds: each one's transactional publisher (whose start fences any
older holder), marks and sources. `take` starts shards in the background; `release` stops
their sources, checkpoints them in their own transactions and closes them.

A shard that is fenced is dropped, not retried: a newer holder has it, and starting it again
would fence that one in turn. The group's next assignment says who holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from aiokafka.errors import KafkaError

from bridge import metrics
from bridge.backoff import KAFKA_CAP_S, Backoff
from bridge.config import Settings
from bridge.errors import PublishError
from bridge.events import Event
from bridge.marks import MarkBook
from bridge.publish import Publisher
from bridge.publish.transactional import Fenced, ShardPublisher
from bridge.shard_state import Owns, recover_shards, shard_checkpoint
from bridge.shards import ShardPlan
from bridge.state import MarkOf, end_offsets, read_latest
from bridge.supervisor import Source, SourceState, keep_running
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

#: Builds a shard's sources: (its plan, its publisher, its books by kind) -> sources.
SourceFactory = Callable[[ShardPlan, ShardPublisher, dict[str, MarkBook]], list[Source]]


@dataclass(frozen=True)
class MarkedTopic:
    """An output topic whose marks a shard recovers: its kind, name, and reading."""

    kind: str
    topic: str
    mark_of: MarkOf
    owns: Callable[[ShardPlan], Callable[[str], bool] | None]
    keep: int


@dataclass
class Shard:
    """One running shard."""

    plan: ShardPlan
    publisher: ShardPublisher
    books: dict[str, MarkBook]
    states: list[SourceState]
    task: asyncio.Task[None] | None = None
    fenced: bool = False
    written: dict[str, int] = field(default_factory=dict)  # book versions checkpointed

    @property
    def healthy(self) -> bool:
        return not self.fenced and self.publisher.healthy


class ShardHost:
    """Runs the shards the group assigns to this replica."""

    def __init__(
        self,
        settings: Settings,
        dead: Publisher,
        plans: Sequence[ShardPlan],
        topics: Sequence[MarkedTopic],
        make_sources: SourceFactory,
    ) -> None:
        self._settings = settings
        self._dead = dead
        self._plans = plans
        self._topics = topics
        self._make_sources = make_sources
        self._taken: set[int] = set()
        self._running: dict[int, Shard] = {}
        self._starting: set[asyncio.Task[None]] = set()
        self._soon: asyncio.Task[None] | None = None  # the checkpoint callers may still join
        self._failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.published = 0  # events committed by the shards released so far
        self.lost = 0  # events they closed with uncommitted (not counting fenced ones)

    # -- what readiness and the live view see ----------------------------------------------

    @property
    def states(self) -> list[SourceState]:
        return [state for shard in self._running.values() for state in shard.states]

    def healthy(self) -> bool:
        """Every shard taken (with subscriptions) runs, its publisher healthy, its sources
        connected."""
        for n in self._taken:
            if self._plans[n].empty:
                continue
            shard = self._running.get(n)
            if shard is None or not shard.healthy or not all(s.connected for s in shard.states):
                return False
        return True

    # -- taking and releasing --------------------------------------------------------------

    async def take(self, shards: set[int]) -> None:
        """Start `shards` in the background (the group waits for no one's start)."""
        self._taken |= shards
        wanted = {n for n in shards if not self._plans[n].empty and n not in self._running}
        if wanted:
            task = asyncio.create_task(self._start(wanted), name=f"take-shards-{min(wanted)}")
            self._starting.add(task)
            task.add_done_callback(self._starting.discard)

    async def release(self, shards: set[int]) -> None:
        """Stop `shards`: sources first, then a last checkpoint, then their publishers."""
        self._taken -= shards
        grace = self._settings.shutdown_grace_s / 2
        await _stop_all(list(self._starting), grace)  # the eager protocol revokes all
        stopping = [self._running.pop(n) for n in sorted(shards) if n in self._running]
        await _stop_all([s.task for s in stopping if s.task is not None], grace)
        try:
            await asyncio.wait_for(self.checkpoint(stopping), timeout=10)
        except (KafkaError, TimeoutError, PublishError) as exc:
            log.warning(
                "last checkpoint of shards %s failed: %s", [s.plan.shard for s in stopping], exc
            )
        left = await asyncio.gather(*(shard.publisher.close(grace) for shard in stopping))
        for shard, count in zip(stopping, left, strict=True):
            self.published += shard.publisher.published
            self.lost += 0 if shard.publisher.fenced else count
        metrics.HANDOVERS.labels("released").inc(len(stopping))
        metrics.SHARDS_HELD.set(len(self._running))

    async def _start(self, shards: set[int]) -> None:
        """Fence, recover and run `shards`, retrying those Kafka could not start."""
        backoff = Backoff(cap=KAFKA_CAP_S)
        pending = set(shards)
        while pending:
            started = await self._fence(pending)
            try:
                books = await self._recover(started)
            except Exception as exc:  # Kafka away, a read timed out (grouped): retry them
                log.warning("shards %s: recovering their marks failed (%r)", sorted(started), exc)
                await asyncio.gather(*(p.close(0) for p in started.values()))
            except BaseException:
                await asyncio.gather(*(p.close(0) for p in started.values()))
                raise
            else:
                for n, publisher in started.items():
                    self._run(self._plans[n], publisher, books[n])
                    pending.discard(n)
            if pending:
                await asyncio.sleep(backoff.next_delay())

    async def _fence(self, shards: set[int]) -> dict[int, ShardPublisher]:
        """Start each shard's publisher: Kafka aborts the older holder's open transaction."""
        kafka = self._settings.kafka
        publishers = {
            n: ShardPublisher(kafka, self._settings.shards.transactional_id(n), dead=self._dead)
            for n in sorted(shards)
        }
        try:
            outcomes = await asyncio.gather(
                *(p.start() for p in publishers.values()), return_exceptions=True
            )
        except BaseException:  # cancelled by a revoke: close what did start
            await asyncio.gather(*(p.close(0) for p in publishers.values()))
            raise
        started = {}
        for (n, publisher), outcome in zip(publishers.items(), outcomes, strict=True):
            if outcome is None:
                started[n] = publisher
            else:
                log.warning("shard %d: its publisher did not start (%r)", n, outcome)
        return started

    async def _recover(self, started: dict[int, ShardPublisher]) -> dict[int, dict[str, MarkBook]]:
        """The marks of every started shard: one read of each topic for all of them, the
        topics side by side (a hand-over waits for the slowest, not for their sum)."""
        books: dict[int, dict[str, MarkBook]] = {n: {} for n in started}
        kafka = self._settings.kafka

        async def recover(marked: MarkedTopic, owners: dict[int, Owns]) -> None:
            upto = await end_offsets(kafka, marked.topic)  # high watermarks after the fence
            recovered = await recover_shards(
                kafka,
                marked.topic,
                marked.mark_of,
                owners,
                count=self._settings.shards.count,
                upto=upto,
                keep=marked.keep,
            )
            for n, book in recovered.items():
                books[n][marked.kind] = book

        async with asyncio.TaskGroup() as group:
            for marked in self._topics:
                owners = {}
                for n in started:
                    owns = marked.owns(self._plans[n])
                    if owns is not None:
                        owners[n] = owns
                if owners:
                    group.create_task(recover(marked, owners))
        return books

    def _run(self, plan: ShardPlan, publisher: ShardPublisher, books: dict[str, MarkBook]) -> None:
        publisher.checkpoints_with(self.checkpoint_soon)
        sources = self._make_sources(plan, publisher, books)
        shard = Shard(plan, publisher, books, [SourceState(s.name) for s in sources])
        shard.task = asyncio.create_task(
            self._supervise(shard, sources), name=f"shard-{plan.shard}"
        )
        self._running[plan.shard] = shard
        metrics.HANDOVERS.labels("taken").inc()
        metrics.SHARDS_HELD.set(len(self._running))
        log.info("shard %d: running %d sources", plan.shard, len(sources))

    async def _supervise(self, shard: Shard, sources: list[Source]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                for source, state in zip(sources, shard.states, strict=True):
                    group.create_task(keep_running(source, state=state), name=source.name)
                group.create_task(shard.publisher.watch(), name=f"watch-{shard.plan.shard}")
        except* Fenced:
            self._drop(shard)
        except* PublishError as group:  # the shared publisher is gone: the service stops
            if not self._failure.done():
                self._failure.set_exception(group.exceptions[0])
        if shard.fenced:
            await self._retake_if_still_ours(shard)

    async def _retake_if_still_ours(self, shard: Shard) -> None:
        """A fence without a rebalance is the broker aborting a transaction that outlived
        `kafka.transaction_timeout_ms` (Kafka away that long), not a newer holder: once the
        membership has had the time to hear of a rebalance (a session timeout and two
        heartbeats) and has not, the shard starts again. A release cancels this wait."""
        shards = self._settings.shards
        await asyncio.sleep((shards.session_timeout_ms + 2 * shards.heartbeat_interval_ms) / 1000)
        n = shard.plan.shard
        if n not in self._taken or self._running.get(n) is not shard:
            return
        log.warning("shard %d: still assigned here after its fence; starting it again", n)
        del self._running[n]
        metrics.SHARDS_HELD.set(len(self._running))
        await shard.publisher.close(0)
        await self.take({n})

    async def failed(self) -> None:
        """Raise the PublishError of the shared publisher once a shard meets it."""
        await self._failure

    def _drop(self, shard: Shard) -> None:
        shard.fenced = True
        metrics.HANDOVERS.labels("fenced").inc()
        log.error(  # one line: the cause is known
            "shard %d: fenced (a newer holder took it, or Kafka aborted a transaction older "
            "than kafka.transaction_timeout_ms); dropped",
            shard.plan.shard,
        )

    # -- checkpoints -----------------------------------------------------------------------

    async def checkpoint(self, shards: Sequence[Shard] | None = None) -> None:
        """Write the books that changed, each in its shard's transaction; the topic's end
        offsets are read before the marks are copied."""
        chosen = [s for s in (self._running.values() if shards is None else shards) if s.healthy]
        kafka, count = self._settings.kafka, self._settings.shards.count
        records: dict[int, list[tuple[str, bytes]]] = {}
        versions: dict[int, dict[str, int]] = {}
        for marked in self._topics:
            changed = [
                (shard, book)
                for shard in chosen
                if (book := shard.books.get(marked.kind)) is not None
                and shard.written.get(marked.kind) != book.version
            ]
            if not changed:
                continue
            offsets = await end_offsets(kafka, marked.topic)
            for shard, book in changed:
                n = shard.plan.shard
                versions.setdefault(n, {})[marked.kind] = book.version
                records.setdefault(n, []).extend(
                    shard_checkpoint(book, n, count, offsets, kafka.max_record_bytes)
                )
        by_shard = {shard.plan.shard: shard for shard in chosen}
        outcomes = await asyncio.gather(
            *(by_shard[n].publisher.commit([], recs) for n, recs in records.items()),
            return_exceptions=True,
        )
        for n, outcome in zip(records, outcomes, strict=True):
            if outcome is None:
                by_shard[n].written.update(versions[n])
            elif isinstance(outcome, PublishError):
                log.warning("shard %d: checkpoint refused (%s)", n, outcome)
            elif isinstance(outcome, BaseException):
                raise outcome

    async def checkpoint_soon(self) -> None:
        """A checkpoint of every running shard, shared by all who ask before it copies the
        marks (a wave of new subscriptions makes one commit, not one each)."""
        soon = self._soon
        if soon is None:
            soon = self._soon = asyncio.create_task(self._checkpoint_now(), name="checkpoint")
            soon.add_done_callback(_observed)  # its callers may all be cancelled meanwhile
        await asyncio.shield(soon)

    async def _checkpoint_now(self) -> None:
        self._soon = None  # who asks from now on may have marks this copy would miss
        await self.checkpoint()

    async def checkpoint_forever(self, interval_s: float = 5.0) -> None:
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.checkpoint()
            except (KafkaError, OSError, TimeoutError) as exc:
                log.warning("checkpoint failed, will retry: %s", exc)


class ShardTransactions:
    """The settlement poller's sink in a shard: its events and checkpoints go in the shard's
    transactions, so a fenced holder cannot settle twice."""

    def __init__(self, settings: Settings, publisher: ShardPublisher) -> None:
        self._kafka = settings.kafka
        self._publisher = publisher

    async def start(self, topics: Sequence[str]) -> None:
        if not self._publisher.healthy:
            raise PublishError(f"{self._publisher.transactional_id}: stopped")

    async def read_checkpoints(self, keys: Sequence[str]) -> dict[str, bytes | None]:
        return await read_latest(self._kafka, list(keys))

    async def close(self) -> None:
        """The shard closes its publisher, not the poller."""

    async def commit(
        self, events: Sequence[tuple[str, Event]], checkpoints: Sequence[tuple[str, bytes]]
    ) -> None:
        await self._publisher.commit(events, checkpoints)


def _observed(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.debug("an early checkpoint failed: %r", exc)


async def _stop_all(tasks: Sequence[asyncio.Task[None]], grace: float) -> None:
    """Cancel `tasks` and wait for them, up to `grace`: a task that will not end is logged
    and left behind, so that a release always finishes within the rebalance."""
    ended = await asyncio.gather(*(cancel_and_wait(task, grace) for task in tasks))
    for task, done in zip(tasks, ended, strict=True):
        if not done:
            log.error("%s did not stop within %.0fs; its shards are released anyway", task, grace)
