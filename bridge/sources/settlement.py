"""The settlement poller: official daily closes from `nav_daily`, onto Kafka exactly once.

Each poll writes its settlement events, dead letters and new checkpoints in one Kafka
transaction; the book moves on only after the commit. Why: docs/design.md, "Settlements".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import ProducerFenced

from bridge import metrics
from bridge.config import KafkaSettings, SettlementSettings
from bridge.errors import AuthError, BadRecord, ConfigError, PublishError, UpstreamError
from bridge.events import SETTLEMENT, Event, dead_letter
from bridge.kafka import ensure_topics, new_producer
from bridge.normalize.settlement_book import (
    LOOKBACK_DAYS,
    Checkpoint,
    Plan,
    SettlementBook,
    checkpoint_key,
)
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridge.sources.vinter_rest import VinterRest
from bridge.state import STATE_HEADERS, read_latest
from bridge.supervisor import Progress

log = logging.getLogger(__name__)

NAME = "vinter.settlement"
CONCURRENCY = 32
ABORT_TIMEOUT_S = 10.0
SECONDS_PER_DAY = 86_400


@dataclass(frozen=True, slots=True)
class PollReport:
    """What one poll did."""

    symbols: int
    fetched: int
    records: int
    settlements: int
    revisions: int
    dead_letters: int
    seconds: float


def _minutes(value: str, key: str) -> int:
    hours, _, minutes = value.partition(":")
    total = int(hours) * 60 + int(minutes)
    if int(hours) > 23 or int(minutes) > 59:
        raise ConfigError(key, f"{value!r} is not a time of day (HH:MM, UTC)")
    return total


def next_poll_in(now: datetime, settings: SettlementSettings) -> float:
    """Seconds until the next poll, polling at `now` (an aware datetime).

    Inside the UTC window [window_start, window_end) (which may wrap past midnight; equal
    ends mean no window): `window_interval_s`. Outside: `interval_s`, cut short so that the
    first poll of the window falls on its start.
    """
    start = _minutes(settings.window_start, "settlement.window_start") * 60
    end = _minutes(settings.window_end, "settlement.window_end") * 60
    moment = now.astimezone(UTC)
    second = moment.hour * 3600 + moment.minute * 60 + moment.second + moment.microsecond / 1e6
    if start == end:
        return settings.interval_s
    inside = start <= second < end if start < end else (second >= start or second < end)
    if inside:
        return settings.window_interval_s
    return min(settings.interval_s, (start - second) % SECONDS_PER_DAY)


class SettlementPoller:
    """Polls `nav_daily` for `settings.symbols` and publishes settlements exactly once.

    As a supervised source: `keep_running(poller)`. Directly (tests, benchmarks):
    `async with poller: report = await poller.poll()`.
    """

    name = NAME

    def __init__(
        self,
        settings: SettlementSettings,
        kafka: KafkaSettings,
        rest: VinterRest,
        *,
        lookback_days: int = LOOKBACK_DAYS,
        concurrency: int = CONCURRENCY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        next_poll_in(datetime.now(UTC), settings)  # a bad window fails here, naming its key
        self._settings = settings
        self._kafka = kafka
        self._rest = rest
        self._lookback_days = lookback_days
        self._concurrency = concurrency
        self._clock = clock
        self._symbols: list[str] = list(dict.fromkeys(settings.symbols))
        self._producer: AIOKafkaProducer | None = None
        self._book: SettlementBook | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    async def __aenter__(self) -> SettlementPoller:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def book(self) -> SettlementBook:
        if self._book is None:
            raise RuntimeError("the settlement poller is not started")
        return self._book

    async def start(self) -> None:
        """Create the topics, start the transactional producer, then load the checkpoints.

        The producer comes first: its start fences an older instance and aborts that one's
        open transaction, so no half-written poll is pending when the checkpoints are read.
        """
        if self._producer is not None:
            return
        topics = self._kafka.topics
        if self._kafka.create_topics:
            await ensure_topics(self._kafka, [topics.settlements, topics.dlq, topics.state])
        producer = new_producer(self._kafka, transactional_id=self._settings.transactional_id)
        try:
            await producer.start()
            stored = await read_latest(self._kafka, [checkpoint_key(s) for s in self._symbols])
        except BaseException:
            await producer.stop()
            raise
        checkpoints: list[Checkpoint] = []
        for symbol in self._symbols:
            raw = stored.get(checkpoint_key(symbol))
            if raw:
                try:
                    checkpoints.append(Checkpoint.from_bytes(raw, symbol=symbol))
                except BadRecord:
                    await producer.stop()
                    # Settling again from scratch would publish duplicates: stop instead.
                    log.error(  # noqa: TRY400 - the reason is in the message; no traceback needed
                        "%s: the checkpoint %s in %s is unreadable; fix or delete it",
                        self.name,
                        checkpoint_key(symbol),
                        topics.state,
                    )
                    raise
        self._book = SettlementBook(
            checkpoints,
            lookback_days=self._lookback_days,
            max_record_bytes=self._kafka.max_record_bytes,
        )
        self._producer = producer
        log.info(
            "%s: %d symbols, %d with checkpoints", self.name, len(self._symbols), len(checkpoints)
        )

    async def close(self) -> None:
        """Stop the producer. Safe to call twice; `start` may be called again afterwards."""
        producer, self._producer = self._producer, None
        self._book = None
        if producer is not None:
            await producer.stop()

    async def session(self, progress: Progress) -> None:
        """Poll on schedule until something fails (the supervisor's contract)."""
        await self.start()
        try:
            progress.up()
            loop = asyncio.get_running_loop()
            while True:
                delay = next_poll_in(datetime.fromtimestamp(self._clock(), UTC), self._settings)
                began = loop.time()
                await self.poll(progress)
                await asyncio.sleep(max(0.0, delay - (loop.time() - began)))
        finally:
            await self.close()

    # -- one poll ----------------------------------------------------------------------------

    async def poll(self, progress: Progress | None = None) -> PollReport:
        """Fetch every symbol, publish what changed in one transaction, then move the book.

        Raises the first AuthError (or else UpstreamError) of the poll after committing the
        symbols that did answer; PublishError if another instance fenced this one.
        """
        book = self.book
        began = time.perf_counter()
        now_ms = int(self._clock() * 1000)
        outcomes = await self._fetch_all(book, now_ms)
        plans: list[Plan] = []
        bad_bodies: list[Event] = []
        failure: UpstreamError | None = None
        fetched = records = 0
        for symbol in self._symbols:
            outcome = outcomes.get(symbol)
            if isinstance(outcome, list):
                fetched += 1
                records += len(outcome)
                plan = book.plan(symbol, outcome)
                if plan.changed:
                    plans.append(plan)
            elif isinstance(outcome, BadRecord):
                bad_bodies.append(_bad_body(symbol, outcome, self._kafka.max_record_bytes))
            elif isinstance(outcome, UpstreamError) and _worse(outcome, failure):
                failure = outcome
        if records:
            metrics.RECEIVED.labels(self.name).inc(records)
        if progress is not None and fetched:
            progress.delivered(fetched)

        settlements = sum(len(plan.events) for plan in plans)
        refusals = [(plan.symbol, r) for plan in plans for r in plan.refused]
        if plans or bad_bodies:
            await self._commit(plans, bad_bodies)
            book.apply(plans)
            self._count(plans, bad_bodies)
        report = PollReport(
            symbols=len(self._symbols),
            fetched=fetched,
            records=records,
            settlements=settlements,
            revisions=sum(1 for p in plans for e in p.events if e.data["revision"] > 1),
            dead_letters=len(refusals) + len(bad_bodies),
            seconds=time.perf_counter() - began,
        )
        if settlements or report.dead_letters:
            log.info(
                "%s: %d settlements (%d revisions), %d dead letters in %.2fs",
                self.name,
                settlements,
                report.revisions,
                report.dead_letters,
                report.seconds,
            )
        if failure is not None:
            raise failure
        return report

    async def _fetch_all(self, book: SettlementBook, now_ms: int) -> dict[str, Any]:
        """symbol -> its records (a list), or the BadRecord / UpstreamError it ended with."""
        outcomes: dict[str, Any] = {}
        refused = False
        backfill = self._settings.backfill_days

        async def fetch(symbol: str) -> None:
            nonlocal refused
            start = book.fetch_start(symbol, now_ms, backfill)
            try:
                outcomes[symbol] = await self._rest.records(
                    "daily", symbol, start_ms=start, end_ms=now_ms
                )
            except (BadRecord, UpstreamError) as exc:
                outcomes[symbol] = exc
                refused = refused or isinstance(exc, AuthError)

        queue = iter(self._symbols)
        first = next(queue, None)
        if first is None:
            return outcomes
        await fetch(first)  # alone: refused credentials cost one request, not one per symbol

        async def worker() -> None:
            for symbol in queue:
                if refused:
                    return
                await fetch(symbol)

        if not refused:
            async with asyncio.TaskGroup() as group:
                for _ in range(min(self._concurrency, len(self._symbols))):
                    group.create_task(worker())
        return outcomes

    async def _commit(self, plans: Sequence[Plan], bad_bodies: Sequence[Event]) -> None:
        """Send the plans' events, dead letters and checkpoints in one transaction; commit."""
        producer = self._producer
        if producer is None:
            raise RuntimeError("the settlement poller is not started")
        topics = self._kafka.topics
        try:
            await producer.begin_transaction()
            sent: list[asyncio.Future[Any]] = []
            for plan in plans:
                for event in plan.events:
                    sent.append(await self._send(producer, topics.settlements, event))
                for refusal in plan.refused:
                    letter = dead_letter(
                        source=NAME,
                        raw=refusal.raw,
                        reason=refusal.reason,
                        detail=refusal.detail,
                        key=plan.symbol,
                        event_type=SETTLEMENT,
                        max_bytes=self._kafka.max_record_bytes,
                    )
                    sent.append(await self._send(producer, topics.dlq, letter))
                sent.append(
                    await producer.send(
                        topics.state,
                        plan.checkpoint.to_bytes(),
                        key=checkpoint_key(plan.symbol).encode(),
                        headers=STATE_HEADERS,
                    )
                )
            for letter in bad_bodies:
                sent.append(await self._send(producer, topics.dlq, letter))
            await _acknowledged(sent)
            await producer.commit_transaction()
        except ProducerFenced as exc:
            await self.close()
            log.error(  # noqa: TRY400 - one clear line; the cause is known
                "%s: fenced: another instance runs with transactional_id %r; this one stops",
                self.name,
                self._settings.transactional_id,
            )
            raise PublishError(
                f"{self.name}: fenced by another instance with transactional_id "
                f"{self._settings.transactional_id!r}"
            ) from exc
        except BaseException:
            # The outcome may be unknown (a commit can fail after the broker applied it), so
            # the book cannot be trusted any more: close, and let a new start re-read it.
            await self._abort(producer)
            await self.close()
            raise

    @staticmethod
    async def _send(producer: AIOKafkaProducer, topic: str, event: Event) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = await producer.send(
            topic, event.to_json(), key=event.key.encode(), headers=event.headers()
        )
        return future

    async def _abort(self, producer: AIOKafkaProducer) -> None:
        """Best effort: a producer whose transaction failed is closed by the caller anyway,
        and the next start aborts whatever is left open."""
        with contextlib.suppress(Exception):
            async with asyncio.timeout(ABORT_TIMEOUT_S):
                await producer.abort_transaction()

    def _count(self, plans: Sequence[Plan], bad_bodies: Sequence[Event]) -> None:
        topics = self._kafka.topics
        settlements = sum(len(plan.events) for plan in plans)
        if settlements:
            metrics.PUBLISHED.labels(topics.settlements).inc(settlements)
        for plan in plans:
            for refusal in plan.refused:
                metrics.DEAD_LETTERS.labels(NAME, refusal.reason).inc()
        for letter in bad_bodies:
            metrics.DEAD_LETTERS.labels(REST_SOURCE, letter.data["reason"]).inc()
        dead = sum(len(plan.refused) for plan in plans) + len(bad_bodies)
        if dead:
            metrics.PUBLISHED.labels(topics.dlq).inc(dead)


async def _acknowledged(sent: Sequence[asyncio.Future[Any]]) -> None:
    """Wait for every send of a transaction; raise the first failure (all are read, so no
    failed future is left unobserved)."""
    for outcome in await asyncio.gather(*sent, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome


def _bad_body(symbol: str, error: BadRecord, max_bytes: int) -> Event:
    """The dead letter of a response body that is not the documented envelope."""
    return dead_letter(
        source=REST_SOURCE,
        raw=error.raw or b"",
        reason=error.reason,
        detail=error.detail,
        key=symbol,
        event_type=SETTLEMENT,
        max_bytes=max_bytes,
    )


def _worse(error: UpstreamError, than: UpstreamError | None) -> bool:
    """Whether `error` is the one to raise: the first of the poll, or the first AuthError."""
    return than is None or (isinstance(error, AuthError) and not isinstance(than, AuthError))
