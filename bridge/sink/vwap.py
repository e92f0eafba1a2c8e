"""Where one VWAP subscription's decoded ticks go: an interval at or below its instrument's
mark is a duplicate, the first interval of an instrument in a session after a reconnect or
restart is preceded by a `bridge.gap` event (VWAP has no replay), then it is published."""

from __future__ import annotations

import logging
from typing import Any

from bridge import metrics
from bridge.errors import BadRecord
from bridge.events import VWAP_TICK, Event
from bridge.marks import MarkBook
from bridge.normalize.vwap import format_uid, gap_event
from bridge.publish import Publisher

log = logging.getLogger(__name__)


class VwapSink:
    """The sink of one VWAP source (`name`); `book` is the VWAP topic's marks, shared by
    every VWAP source and recovered from Kafka before the sink is built."""

    def __init__(self, name: str, publisher: Publisher, book: MarkBook) -> None:
        self.name = name
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

    def duplicate(self, key: str, mark: int) -> bool:
        """Whether the interval `mark` of `key` was published already (then counted)."""
        if self._book.is_duplicate(key, mark):
            self.duplicates += 1
            self._deduplicated.inc()
            return True
        return False

    async def tick(self, event: Event, key: str, mark: int, received_at: float) -> None:
        """Publish a tick that is not a duplicate (after its gap event, if one is due)."""
        if key not in self._fresh:
            self._fresh.add(key)
            await self._maybe_gap(key, event.key, event.data)
        await self._publisher.publish(event, received_at=received_at)
        self._book.advance(key, mark)

    async def _maybe_gap(self, key: str, subject: str, data: dict[str, Any]) -> None:
        last = self._book.get(key)
        reason = self._reason
        if last is None or (reason == "restart" and key not in self._recovered):
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
