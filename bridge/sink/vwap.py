"""Where one VWAP subscription's decoded ticks go: an interval at or below its instrument's
mark is a duplicate, the first interval of an instrument in a session after a reconnect or
restart is preceded by a `bridge.gap` event (VWAP has no replay), then it is published."""

from __future__ import annotations

import logging
from typing import Any

from bridge import metrics
from bridge.errors import BadRecord
from bridge.events import VWAP_TICK, Event
from bridge.freshness import Row
from bridge.marks import MarkBook
from bridge.normalize.vwap import format_uid, gap_event
from bridge.publish import EventSink

log = logging.getLogger(__name__)


class VwapSink:
    """The sink of one VWAP source (`name`); `book` is the VWAP topic's marks, shared by
    every VWAP source and recovered from Kafka before the sink is built."""

    def __init__(
        self, name: str, publisher: EventSink, book: MarkBook, freshness: Row | None = None
    ) -> None:
        self.name = name
        self.freshness = freshness or Row("vwap", name, name, 0.0)  # the freshness board's row
        self._publisher = publisher
        self._book = book
        self._recovered = frozenset(book.snapshot())  # marks from before this process
        self._reason = "restart"
        self._fresh: set[str] = set()  # instruments published in this session
        self._deduplicated = metrics.DEDUPLICATED.labels(name)
        self._gaps = metrics.GAPS.labels(name)
        self.duplicates = 0
        self.gaps = 0
        self.bad_records = 0
        self.sessions = 0

    def session(self) -> None:
        """A new session starts: its first interval of each known instrument follows a gap."""
        self.sessions += 1
        self._reason = "restart" if self.sessions == 1 else "reconnect"
        self._fresh = set()

    async def take(self, items: list[tuple[Event, str, int, float] | BadRecord]) -> None:
        """What the decoder made of one read, in order: each tick (event, mark key, interval,
        received-at) published unless it is a duplicate, after its gap event if one is due;
        each refusal dead-lettered."""
        is_duplicate, advance = self._book.is_duplicate, self._book.advance
        publish = self._publisher.publish
        fresh, newest = self._fresh, 0
        for item in items:
            if isinstance(item, BadRecord):
                await self.dead_letter(item.raw or b"", item)
                continue
            event, key, mark, received_at = item
            if is_duplicate(key, mark):
                self.duplicates += 1
                self._deduplicated.inc()
                continue
            if key not in fresh:
                fresh.add(key)
                await self._resume(key, mark, event.key, event.data)
            await publish(event, received_at=received_at)
            advance(key, mark)
            newest = mark
        if newest:
            self.freshness.published(newest / 1e9)

    async def _resume(self, key: str, mark: int, subject: str, data: dict[str, Any]) -> None:
        """Before an instrument's first interval in this session: its gap event if one is
        due; for its first interval ever, its mark (just before it) committed first, so the
        next holder knows a gap follows even if this one dies before its next commit."""
        last = self._book.get(key)
        if last is None:
            self._book.advance(key, mark - 1)
            await self._publisher.persist_marks()
            return
        reason = self._reason
        if reason == "restart" and key not in self._recovered:
            return
        gap = gap_event(
            subject,
            data["aggregate"],
            format_uid(last),
            data["uid"],
            reason,
            source=self.name,
        )
        await self._publisher.publish(gap)
        self.gaps += 1
        self._gaps.inc()
        log.debug("%s: %s gap on %s after %s", self.name, reason, key, gap.data["last_before"])

    async def dead_letter(self, raw: bytes | str, exc: BadRecord) -> None:
        self.bad_records += 1
        await self._publisher.dead_letter(
            source=self.name,
            raw=raw,
            reason=exc.reason,
            detail=exc.detail,
            event_type=VWAP_TICK,
        )
