"""Where one NAV symbol's decoded ticks go: the mark and the versions kept decide whether a
tick is new, a duplicate, a stale copy or the next revision of its tick; a jump past the
cadence asks the source for a back-fill first; then it is published, bad input dead-lettered.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson

from bridge import metrics
from bridge.errors import BadRecord
from bridge.events import NAV_TICK, Event, kafka_headers, serialize
from bridge.freshness import Row
from bridge.marks import MarkBook, Verdict, Version, version_of
from bridge.normalize.nav import (
    NAV_TICK_VERSION,
    TICK_TIMESTAMP,
    newest_per_timestamp,
    revise,
    revise_json,
)
from bridge.publish import EventSink

log = logging.getLogger(__name__)

#: The cadence of the frequencies that have one: a jump of more than half as much again is
#: a record missed. Real-time has none documented: its cadence is measured.
NOMINAL_STEP_MS: Final = {"hourly": 3_600_000, "daily": 86_400_000}


#: The source's back-fill: publish what REST has after a mark and before a timestamp.
Backfill = Callable[[int, int], Awaitable[None]]


class NavSink:
    """The sink of one symbol's NAV source (`name` is the source's name). `backfill` is
    what the source does when the live feed jumped; at most one such call every
    `gap_check_interval_s`."""

    def __init__(
        self,
        symbol: str,
        name: str,
        publisher: EventSink,
        book: MarkBook,
        *,
        gaps: GapRule,
        gap_check_interval_s: float,
        backfill: Backfill,
        freshness: Row | None = None,
    ) -> None:
        self.symbol = symbol
        self.name = name
        self.freshness = freshness or Row("nav", symbol, name, 0.0)  # the freshness board's row
        self.publisher = publisher
        self.book = book
        self.topic = publisher.topic_for(NAV_TICK)
        self.headers = kafka_headers(NAV_TICK, NAV_TICK_VERSION)
        self._gaps = gaps
        self._gap_check_interval_s = gap_check_interval_s
        self._next_gap_check = 0.0
        self._backfill = backfill
        self._deduplicated = metrics.DEDUPLICATED.labels(name)
        self._revisions = metrics.REVISIONS.labels(name)
        self._gap_checks = metrics.GAP_CHECKS.labels(name)
        self.published = 0
        self.duplicates = 0
        self.revisions = 0
        self.bad_records = 0
        self.gap_checks = 0

    async def take(self, items: list[tuple[bytes | BadRecord, float]], *, source: str) -> int:
        """What the receiver decoded from the socket, in order: each tick (`TICK_TIMESTAMP`,
        then the event's JSON, with when it was received) published unless it is a
        duplicate, after a back-fill if the feed jumped; each refusal dead-lettered under
        `source`. Returns how many ticks there were."""
        # The hot path: locals for everything it calls, one call per read, not per tick.
        symbol, book, gaps = self.symbol, self.book, self._gaps
        get_mark, published = book.get, book.published
        send, topic, headers = self.publisher.send, self.topic, self.headers
        timestamp, skip = TICK_TIMESTAMP.unpack_from, TICK_TIMESTAMP.size
        ticks = newest = 0
        for payload, received_at in items:
            if not isinstance(payload, bytes):
                await self.dead_letter(payload.raw or b"", payload, source)
                continue
            ticks += 1
            ts: int = timestamp(payload)[0]
            value = payload[skip:]
            mark = get_mark(symbol)
            if mark is None:
                await self.begin_after(ts - 1)  # no start from REST: just before it
            elif ts <= mark:
                await self.again_json(ts, value, received_at)
                continue
            else:
                if ts - mark > gaps.threshold:
                    mark = await self._close_gap(mark, ts)
                if gaps.measured:
                    gaps.step(ts - mark)
            await send(topic, symbol, value, headers, received_at)
            published(symbol, ts, value)  # its version is read from it if ever needed
            self.published += 1
            newest = ts
        if newest:
            self.freshness.published(newest / 1000)
        return ticks

    async def page(
        self,
        decoded: list[tuple[Event, Version]],
        refused: list[BadRecord],
        received_at: float,
        *,
        source: str,
    ) -> None:
        """One REST window of `source`, decoded (in timestamp order): the newest version of
        each timestamp is published, the others counted as stale; refusals dead-lettered."""
        for bad in refused:
            await self.dead_letter(bad.raw or b"", bad, source)
        winners = newest_per_timestamp(decoded)
        for _ in range(len(decoded) - len(winners)):
            self.duplicate(Verdict.STALE)
        for event, version in winners:
            await self.tick(event, version, received_at)

    async def tick(self, event: Event, version: Version, received_at: float) -> None:
        """Publish a back-filled tick unless it is a duplicate."""
        ts: int = event.data["timestamp"]
        mark = self.book.get(self.symbol)
        if mark is None:
            await self.begin_after(ts - 1)  # no start from REST: just before it
        elif ts <= mark:
            await self.again(ts, version, received_at, event=event)
            return
        elif self._gaps.measured:
            self._gaps.step(ts - mark)
        await self.new(event, ts, version, received_at)

    async def begin_after(self, ts: int) -> None:
        """The symbol has no mark: it starts after `ts`, a mark committed before anything
        is published, so a holder that dies before its next commit leaves the next one a
        place to back-fill from (without it, the next one starts at the live feed)."""
        self.book.advance(self.symbol, ts)
        await self.publisher.persist_marks()

    async def _close_gap(self, mark: int, ts: int) -> int:
        """The live feed jumped from `mark` to `ts`: have the source publish what REST has in
        between first. Returns the mark after."""
        wait = self._next_gap_check - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._next_gap_check = time.monotonic() + self._gap_check_interval_s
        self.gap_checks += 1
        self._gap_checks.inc()
        log.debug("%s: the live feed jumped from %d to %d; asking REST", self.name, mark, ts)
        await self._backfill(mark, ts)
        return self.book.get(self.symbol) or mark

    async def again_json(self, ts: int, payload: bytes, received_at: float | None) -> None:
        """`again`, for a record the receiver normalized: the event's JSON."""
        doc = orjson.loads(payload)
        await self.again(ts, version_of(doc["data"]), received_at, doc=doc)

    async def again(
        self,
        ts: int,
        version: Version,
        received_at: float | None,
        *,
        event: Event | None = None,
        doc: dict[str, Any] | None = None,
    ) -> None:
        """A record at or below the mark (as an `event`, or its envelope `doc`): publish it
        if it is a revision or arrived late, else count it."""
        verdict, newest = self.book.judge(self.symbol, ts, version)
        if verdict is Verdict.REVISION and newest is not None:
            revision = newest.revision + 1
        elif verdict is Verdict.LATE:
            revision = 1
        else:
            self.duplicate(verdict)
            return
        if event is not None:
            await self.publisher.publish(revise(event, revision), received_at=received_at)
        elif doc is not None:
            value = serialize(revise_json(doc, revision))
            await self.publisher.send(self.topic, self.symbol, value, self.headers, received_at)
        self.book.remember(self.symbol, ts, version._replace(revision=revision))
        self.published += 1
        self.freshness.published(ts / 1000)
        if revision > 1:
            self.revisions += 1
            self._revisions.inc()
            log.info(
                "%s: revision %d of the tick at %d (official=%s)",
                self.name,
                revision,
                ts,
                version.official,
            )

    async def new(self, event: Event, ts: int, version: Version, received_at: float | None) -> None:
        """Publish a record past the mark."""
        await self.publisher.publish(event, received_at=received_at)
        self.book.published(self.symbol, ts, version)
        self.published += 1
        self.freshness.published(ts / 1000)

    def duplicate(self, verdict: Verdict = Verdict.DUPLICATE) -> None:
        self.duplicates += 1
        self._deduplicated.inc()
        if verdict is Verdict.FORGOTTEN:
            metrics.FORGOTTEN.labels(self.name).inc()

    async def dead_letter(self, raw: bytes | str, exc: BadRecord, source: str) -> None:
        self.bad_records += 1
        await self.publisher.dead_letter(
            source=source,
            raw=raw,
            reason=exc.reason,
            detail=exc.detail,
            key=self.symbol,
            event_type=NAV_TICK,
        )


class GapRule:
    """When a live record's jump past the mark is a gap to fill from REST: past 1.5 times
    the cadence (measured for real-time, never under `floor_ms`)."""

    __slots__ = ("floor_ms", "mean", "measured", "threshold")

    def __init__(self, frequency: str, floor_ms: int) -> None:
        nominal = NOMINAL_STEP_MS.get(frequency)
        self.measured = nominal is None
        self.floor_ms = floor_ms
        self.mean = 0.0
        self.threshold = sys.maxsize if nominal is None else nominal * 3 // 2

    def step(self, step_ms: int) -> None:
        """A record was published `step_ms` after the one before (measured cadence only)."""
        if step_ms > 0:
            mean = self.mean = step_ms if not self.mean else self.mean + (step_ms - self.mean) / 8
            threshold = int(mean * 1.5)
            self.threshold = threshold if threshold > self.floor_ms else self.floor_ms
