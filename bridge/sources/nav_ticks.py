"""Where one NAV symbol's decoded records go: the mark and the versions kept decide whether a
record is new, a duplicate, a stale copy or the next revision of its tick, then it is
published; bad input goes to the dead-letter topic.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from bridge import metrics
from bridge.errors import BadRecord
from bridge.events import NAV_TICK, Event, kafka_headers, serialize
from bridge.marks import MarkBook, Verdict, Version, version_of
from bridge.normalize.nav import NAV_TICK_VERSION, revise, revise_json
from bridge.publish import Publisher

log = logging.getLogger(__name__)


def dumps_or_repr(record: Any) -> bytes | str:
    """A record as JSON for a dead letter, or its repr when JSON cannot hold it."""
    try:
        return orjson.dumps(record)
    except TypeError:
        return repr(record)


class NavTicks:
    """The publishing end of one symbol's NAV source (`name` is the source's name)."""

    def __init__(self, symbol: str, name: str, publisher: Publisher, book: MarkBook) -> None:
        self.symbol = symbol
        self.name = name
        self.publisher = publisher
        self.book = book
        self.topic = publisher.topic_for(NAV_TICK)
        self.headers = kafka_headers(NAV_TICK, NAV_TICK_VERSION)
        self._deduplicated = metrics.DEDUPLICATED.labels(name)
        self._revisions = metrics.REVISIONS.labels(name)
        self.published = 0
        self.duplicates = 0
        self.revisions = 0
        self.bad_records = 0

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
