"""The settlement poller: official daily closes from `nav_daily`, onto Kafka exactly once.

Each poll writes its settlement events, dead letters and new checkpoints in one Kafka
transaction; the book moves on only after the commit. Why: docs/design.md, "Settlements".
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from bridge import metrics
from bridge.config import KafkaSettings, SettlementSettings
from bridge.errors import AuthError, BadRecord, ConfigError, UpstreamError
from bridge.events import SETTLEMENT, Event, dead_letter
from bridge.freshness import BOARD, Row
from bridge.normalize.settlement_book import (
    LOOKBACK_DAYS,
    Checkpoint,
    Plan,
    SettlementBook,
    checkpoint_key,
)
from bridge.sink.transactions import Transactions, TransactionSink
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridge.sources.vinter_rest import VinterRest
from bridge.supervisor import Progress

log = logging.getLogger(__name__)

NAME = "vinter.settlement"
CONCURRENCY = 32
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


#: A daily close is published once a day, revisions aside: silent longer, it is stale.
STALE_AFTER_S: Final = 26 * 3600.0


def poller_name(shard: int) -> str:
    """The name of the poller of `shard`'s settlement symbols."""
    return f"{NAME}@{shard}"


def freshness_row(symbol: str, poller: str) -> Row:
    """The symbol's row on the freshness board; `poller` is the name of its shard's poller."""
    return BOARD.row("settlement", symbol, source=poller, stale_after_s=STALE_AFTER_S)


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
    """Polls `nav_daily` for `settings.symbols` and publishes settlements exactly once, through
    `sink` (default: transactions of its own under `settings.transactional_id`).

    As a supervised source: `keep_running(poller)`. Directly (tests, benchmarks):
    `async with poller: report = await poller.poll()`.
    """

    def __init__(
        self,
        settings: SettlementSettings,
        kafka: KafkaSettings,
        rest: VinterRest,
        *,
        lookback_days: int = LOOKBACK_DAYS,
        concurrency: int = CONCURRENCY,
        clock: Callable[[], float] = time.time,
        sink: TransactionSink | None = None,
        name: str = NAME,
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
        self.name = name
        self._sink = sink or Transactions(kafka, settings.transactional_id, name=name)
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
        """Start the transactional sink (which fences an older instance), then load the
        checkpoints: nothing half-written is pending when they are read."""
        if self._book is not None:
            return
        topics = self._kafka.topics
        await self._sink.start([topics.settlements])
        try:
            stored = await self._sink.read_checkpoints([checkpoint_key(s) for s in self._symbols])
            checkpoints: list[Checkpoint] = []
            for symbol in self._symbols:
                raw = stored.get(checkpoint_key(symbol))
                if raw:
                    checkpoints.append(self._checkpoint(raw, symbol))
        except BaseException:
            await self._sink.close()
            raise
        self._book = SettlementBook(
            checkpoints,
            lookback_days=self._lookback_days,
            max_record_bytes=self._kafka.max_record_bytes,
        )
        log.info(
            "%s: %d symbols, %d with checkpoints", self.name, len(self._symbols), len(checkpoints)
        )

    def _checkpoint(self, raw: bytes, symbol: str) -> Checkpoint:
        try:
            return Checkpoint.from_bytes(raw, symbol=symbol)
        except BadRecord:
            # Settling again from scratch would publish duplicates: stop instead.
            log.error(  # noqa: TRY400 - the reason is in the message; no traceback needed
                "%s: the checkpoint %s in %s is unreadable; fix or delete it",
                self.name,
                checkpoint_key(symbol),
                self._kafka.topics.state,
            )
            raise

    async def close(self) -> None:
        """Stop the sink. Safe to call twice; `start` may be called again afterwards."""
        self._book = None
        await self._sink.close()

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
        """The plans' events, dead letters and checkpoints in one transaction. A failure
        closes the poller: the outcome may be unknown, so the book must be read again."""
        topic = self._kafka.topics.settlements
        events: list[tuple[str, Event]] = []
        for plan in plans:
            events += [(topic, event) for event in plan.events]
            events += [
                (topic, self._refusal(plan.symbol, refusal.raw, refusal.reason, refusal.detail))
                for refusal in plan.refused
            ]
        events += [(topic, letter) for letter in bad_bodies]
        checkpoints = [(checkpoint_key(p.symbol), p.checkpoint.to_bytes()) for p in plans]
        try:
            await self._sink.commit(events, checkpoints)
        except BaseException:
            await self.close()
            raise
        for plan in plans:
            if plan.events:
                newest = max(int(e.data.get("timestamp") or 0) for e in plan.events)
                freshness_row(plan.symbol, self.name).published(newest / 1000)

    def _refusal(self, symbol: str, raw: bytes | str, reason: str, detail: str) -> Event:
        return dead_letter(
            source=NAME,
            raw=raw,
            reason=reason,
            detail=detail,
            key=symbol,
            event_type=SETTLEMENT,
            max_bytes=self._kafka.max_record_bytes,
        )


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
