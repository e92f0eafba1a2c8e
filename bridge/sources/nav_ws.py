"""Vinter NAV over WebSocket: one socket per symbol, onto Kafka, gaps back-filled from REST.

A session is one socket, from connect to end; the supervisor (`bridge.supervisor.keep_running`)
retries. Handshake and connection failures are translated at this boundary into
`UpstreamError`, or `AuthError` naming `vinter.token` when the token is refused (401/403).

The sockets are received in one child process shared by every NAV socket
(`bridge.sources.nav_receiver`, which says why); this side reads each socket's messages from
it in batches. The token travels in the URL's query string, so the URL is never logged or
put into an error: it reaches the child on its stdin only, websockets' log records are
redacted there and again here, every error is built from the status code or the
exception's type only, and errors are raised outside any `except` block, so no exception
chain carries one.

Messages are one JSON record or a JSON array of records. Each record is normalized by
`bridge.normalize.nav.nav_tick` (a message of one valid record already in the receiver
child, which hands over the event's JSON and timestamp: see `TICK` there); a record at or
below the symbol's mark (`timestamp`, in the `MarkBook` shared by every NAV socket) is
dropped and counted; a message that is not JSON, or a record that cannot be mapped, goes to
the dead-letter topic and the stream goes on.

Back-fill. The socket sends only what is appended after the handshake, so whatever the
upstream produced while no socket was open would be lost. Right after the socket opens,
before any live message is read, the session asks REST for the newest record and, if it is
past the mark, for every record in (mark, newest], in time windows, publishing them in
timestamp order through the same de-duplication as live records. Live messages arriving
meanwhile wait in the socket's buffer and are read afterwards; records in both are dropped
as duplicates. The upper bound is the upstream's newest record, not our clock: with a clock
behind the upstream's a wall-clock bound would skip records. The lower bound is never older
than `vinter.backfill_max_age_s` (the skipped span is logged as a warning).

Gaps in the live feed. Records the upstream produces while a socket is open but silent (a
stall that ends before the watchdog fires, or one that began before the socket opened) never
come through that socket: the feed resumes further on. So a live record that jumps past the
mark by more than the symbol's cadence (half as much again as the last step between two
published records: a steady feed, jitter up to 20 %, never triggers it) is held while REST
fills (mark, record) in the same way; then it is published. A jump REST has nothing for
costs one call.

* No mark (the first start for a symbol): nothing is back-filled. There is no known
  position to start from, and publishing the whole REST history is not this component's job.
* The back-fill fails (REST down after its own retries, or the API key refused): whatever
  windows were fetched are published, the failure is logged, and the session ends with the
  error (`AuthError` for `vinter.api_key` is passed through, so the supervisor parks the
  source and says which setting to fix). Live records are not published past an unfilled
  gap: that would move the mark over it for good. They stay available upstream and the next
  session back-fills from the mark again, so nothing is lost, only delayed.

Progress, for the supervisor's backoff, is a valid record read from the socket (published
or a duplicate). Back-filled records are not: a server that accepts and closes every socket
at once must meet a growing delay even though each session back-fills a little from REST.

A socket silent for `vinter.stale_after_s` (default by frequency: real-time 60 s, hourly 2 h,
daily 26 h) ends the session: pings keep the TCP connection alive, the watchdog catches an
upstream that stopped sending. Time spent waiting on Kafka does not count as silence.

Backpressure: `Publisher.publish` waits while Kafka is slow; the session then stops reading,
the socket's messages queue up to `nav_receiver.PAUSE_AT`, the child stops reading that
socket, websockets stops reading the TCP stream, and the upstream sees a full TCP window.
Keepalive pongs wait in that stream too: a stall longer than the keepalive allows closes
the socket, and the next session back-fills from the mark.

Many symbols: each socket is one task here, one in the child, and one connection without
compression (records are small; a deflate context per socket would cost more memory than
it saves bandwidth); an idle socket costs a few tens of kB, its keepalive pings and one
watchdog timer per stale period, never a timer per message.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any, Final
from urllib.parse import quote

import orjson

from bridge import metrics
from bridge.config import VinterSettings
from bridge.errors import AuthError, BadRecord, ConfigError, UpstreamError
from bridge.events import NAV_TICK, kafka_headers
from bridge.normalize.nav import NAV_TICK_VERSION, SOURCE_REST, SOURCE_WS, frequency_of, nav_tick
from bridge.publish import Publisher
from bridge.sources.nav_receiver import TICK, TICK_TIMESTAMP, Ended, NavReceiver, RemoteSocket
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridge.sources.vinter_rest import VinterRest
from bridge.state import MarkBook
from bridge.supervisor import Progress

__all__ = ["STALE_AFTER_S", "NavSocketSource"]

log = logging.getLogger(__name__)

#: Silence that ends a session, per frequency, when `vinter.stale_after_s` is 0.
STALE_AFTER_S: Final = {"real-time": 60.0, "hourly": 2 * 3600.0, "daily": 26 * 3600.0}
#: Back-fill window per REST call (then split by the client if over its 2000 cap): it bounds
#: the memory one back-fill holds and lets a long back-fill publish as it goes.
BACKFILL_WINDOW_MS: Final = {
    "real-time": 3_600_000,
    "hourly": 90 * 86_400_000,
    "daily": 3650 * 86_400_000,
}
OPEN_TIMEOUT_S: Final = 10.0
CLOSE_TIMEOUT_S: Final = 2.0
#: A NAV record is a few hundred bytes; an array of them stays far below this.
MAX_MESSAGE_BYTES: Final = 1 << 20
#: Messages buffered per socket before websockets stops reading the TCP stream (back-fill
#: and slow Kafka both rely on it). Idle sockets hold none.
MAX_QUEUE_MESSAGES: Final = 256
MAX_RETRY_AFTER_S: Final = 300.0


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP-date: our own backoff will do


def _timestamp(record: Any) -> int | None:
    ts = record.get("timestamp") if isinstance(record, dict) else None
    return ts if isinstance(ts, int) and not isinstance(ts, bool) else None


def _dumps(record: Any) -> bytes | str:
    try:
        return orjson.dumps(record)
    except TypeError:
        return repr(record)


class NavSocketSource:
    """The NAV WebSocket of one symbol, as a supervised source named `vinter.nav:{symbol}`.

    `book` is the MarkBook of the NAV ticks topic, shared by every NAV socket and recovered
    from Kafka before the sources are built; `rest` is the shared REST client used to
    back-fill after a reconnect; `receiver` is the child process holding the sockets, also
    shared by every NAV socket.
    """

    def __init__(
        self,
        symbol: str,
        settings: VinterSettings,
        publisher: Publisher,
        book: MarkBook,
        rest: VinterRest,
        *,
        receiver: NavReceiver,
        open_timeout_s: float = OPEN_TIMEOUT_S,
    ) -> None:
        try:
            self.frequency = frequency_of(symbol)
        except BadRecord:
            raise ConfigError("vinter.symbols", f"{symbol!r} must end in -d, -h or -r") from None
        token = settings.token.get_secret_value() if settings.token is not None else ""
        if not token:
            raise ConfigError("vinter.token", "required for the NAV WebSocket")
        self.symbol = symbol
        self.name = f"vinter.nav:{symbol}"
        self._url = (
            f"{settings.ws_url}/ws/nav/{quote(symbol, safe='')}/?token={quote(token, safe='')}"
        )
        self._settings = settings
        self._publisher = publisher
        self._book = book
        self._rest = rest
        self._receiver = receiver
        self._options = {
            "open_timeout": open_timeout_s,
            "ping_interval": settings.ping_interval_s,
            "ping_timeout": settings.ping_interval_s,
            "close_timeout": CLOSE_TIMEOUT_S,
            "max_size": MAX_MESSAGE_BYTES,
            "max_queue": MAX_QUEUE_MESSAGES,
        }
        self.stale_after_s = settings.stale_after_s or STALE_AFTER_S[self.frequency]
        self._window_ms = BACKFILL_WINDOW_MS[self.frequency]
        self._waiting_since: float | None = None  # set while the session waits on the socket
        # A live record further than this past the mark is a gap to fill from REST: 1.5x the
        # last step between published records (none known yet: never).
        self._gap_after = sys.maxsize
        self._received = metrics.RECEIVED.labels(self.name)
        self._deduplicated = metrics.DEDUPLICATED.labels(self.name)
        self.sessions = 0
        self.received = 0
        self.published = 0
        self.backfilled = 0
        self.duplicates = 0
        self.bad_records = 0

    def __repr__(self) -> str:
        return f"NavSocketSource({self.symbol!r}, ws_url={self._settings.ws_url!r})"

    # -- one session -----------------------------------------------------------------------

    async def session(self, progress: Progress) -> None:
        """Connect, back-fill the gap since the mark, then publish live until the end."""
        self.sessions += 1
        sock = await self._open()
        try:
            progress.up()
            await self._backfill()
            await self._watched(sock, progress)
        finally:
            sock.close()

    async def _open(self) -> RemoteSocket:
        try:
            return await self._receiver.open(self._url, self._options, self.symbol)
        except Ended as ended:
            error = ended
        # Raised outside the handler, so the error has no __context__.
        if error.status is not None:
            raise self._refused(error.status, error.retry_after)
        raise UpstreamError(self.name, error.reason)

    def _refused(self, status: int, retry_after: str | None) -> UpstreamError:
        if status in (401, 403):
            return AuthError(
                self.name,
                f"the NAV WebSocket of {self.symbol} refused the token (HTTP {status})",
                setting="vinter.token",
            )
        return UpstreamError(
            self.name,
            f"handshake refused with HTTP {status}",
            retry_after=_retry_after(retry_after),
        )

    # -- back-fill -------------------------------------------------------------------------

    async def _backfill(self) -> None:
        """Publish from REST what the upstream produced after the mark (see the docstring)."""
        mark = self._book.get(self.symbol)
        if mark is not None:
            await self._fill(mark, None)

    async def _fill(self, mark: int, end: int | None) -> None:
        """Publish from REST, in timestamp order, the records after `mark` and before `end`
        (None: up to the upstream's newest record). Raises `UpstreamError` if REST fails."""
        done = 0
        try:
            if end is None:
                newest = _timestamp(await self._rest.latest(self.frequency, self.symbol))
                if newest is None or newest <= mark:
                    return
                end = newest + 1
            start = mark + 1
            oldest = int(time.time() * 1000 - self._settings.backfill_max_age_s * 1000)
            if start < oldest:
                log.warning(
                    "%s: the gap since %d is older than vinter.backfill_max_age_s; records "
                    "before %d are not back-filled",
                    self.name,
                    mark,
                    oldest,
                )
                start = oldest
            while start < end:
                stop = min(start + self._window_ms, end)
                records = await self._rest.records(
                    self.frequency, self.symbol, start_ms=start, end_ms=stop
                )
                received_at = time.monotonic()
                before = self.published
                for record in records:
                    await self._record(record, None, received_at, SOURCE_REST)
                published = self.published - before
                done += published
                self.backfilled += published
                start = stop
        except BadRecord as exc:
            # The REST body itself is unreadable: keep it for inspection, retry later.
            if exc.raw is not None:
                await self._dead_letter(exc.raw, exc, REST_SOURCE)
            why = f"REST answered {exc.reason}"
        except AuthError as exc:
            self._backfill_failed(done, str(exc))
            raise
        except UpstreamError as exc:
            why = str(exc)
        else:
            if done:
                log.info("%s: back-filled %d records from REST after %d", self.name, done, mark)
            return
        self._backfill_failed(done, why)
        raise UpstreamError(self.name, f"back-fill failed: {why}")

    def _backfill_failed(self, done: int, why: str) -> None:
        log.warning(
            "%s: back-fill from REST failed after %d records (%s); live records are held "
            "upstream until a later session fills the gap from the mark",
            self.name,
            done,
            why,
        )

    # -- live ------------------------------------------------------------------------------

    async def _watched(self, sock: RemoteSocket, progress: Progress) -> None:
        """Read the socket under the stale-feed watchdog."""
        loop = asyncio.get_running_loop()
        monotonic = time.monotonic
        stale = self.stale_after_s
        handle: asyncio.TimerHandle | None = None

        def watch() -> None:
            # One timer per silent period, not one per message: when it fires, it either
            # expires the deadline or re-arms at the moment the socket would turn stale.
            nonlocal handle
            since, now = self._waiting_since, monotonic()
            if since is not None and now - since >= stale:
                deadline.reschedule(loop.time())
                return
            handle = loop.call_later(stale if since is None else since + stale - now, watch)

        try:
            async with asyncio.timeout(None) as deadline:
                handle = loop.call_later(stale, watch)
                await self._read(sock, progress)
        except TimeoutError:
            if not deadline.expired():
                raise
            sock.abort()  # a silent peer would not answer a close frame either
            raise UpstreamError(self.name, f"stale: no message for {stale:g}s") from None
        finally:
            self._waiting_since = None
            if handle is not None:
                handle.cancel()

    async def _read(self, sock: RemoteSocket, progress: Progress) -> None:
        # The hot loop: locals instead of attribute look-ups, every message queued by the
        # receiver taken at once, no logging, and the common case inlined from `_record`:
        # one valid record, normalized and serialized by the receiver (a TICK frame), left
        # to de-duplicate and hand to the publisher.
        read = sock.read
        monotonic = time.monotonic
        delivered = progress.delivered
        received = self._received.inc
        symbol = self.symbol
        get_mark = self._book.get
        advance = self._book.advance
        send = self._publisher.send
        topic = self._publisher.topic_for(NAV_TICK)
        headers = kafka_headers(NAV_TICK, NAV_TICK_VERSION)
        timestamp_of = TICK_TIMESTAMP.unpack_from
        skip = TICK_TIMESTAMP.size
        while True:
            self._waiting_since = monotonic()
            try:
                batch = await read()
            except Ended as ended:
                error = ended
                break
            self._waiting_since = None
            for kind, _, payload, received_at in batch:
                if kind != TICK:
                    delivered(await self._message(payload, received_at))
                    continue
                self.received += 1
                received()
                delivered()
                ts: int = timestamp_of(payload)[0]
                mark = get_mark(symbol)
                if mark is not None:
                    if ts <= mark:
                        self._duplicate()
                        continue
                    if ts - mark > self._gap_after:
                        mark = await self._close_gap(mark, ts)
                    self._gap_after = (ts - mark) * 3 // 2
                await send(topic, symbol, payload[skip:], headers, received_at)
                advance(symbol, ts)
                self.published += 1
        if not error.ok:  # raised outside the handler, so the error has no __context__
            raise UpstreamError(self.name, error.reason)

    async def _message(self, raw: bytes, received_at: float) -> int:
        """A message as received: one record, an array of them, else bad input
        (dead-lettered whole). Returns how many valid records it held."""
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            await self._bad_json(raw, exc)
            return 0
        if type(doc) is not list:
            return await self._record(doc, raw, received_at, SOURCE_WS)
        valid = 0
        for item in doc:
            valid += await self._record(item, None, received_at, SOURCE_WS)
        return valid

    async def _bad_json(self, raw: bytes, exc: orjson.JSONDecodeError) -> None:
        self.received += 1
        self._received.inc()
        await self._dead_letter(raw, BadRecord("bad_json", str(exc)), self.name)

    def _duplicate(self) -> None:
        self.duplicates += 1
        self._deduplicated.inc()

    async def _close_gap(self, mark: int, ts: int) -> int:
        """The live feed jumped from `mark` to `ts`: publish what REST has in between first.
        Returns the mark afterwards."""
        log.debug("%s: the live feed jumped from %d to %d; asking REST", self.name, mark, ts)
        await self._fill(mark, ts)
        return self._book.get(self.symbol) or mark

    async def _record(self, record: Any, raw: bytes | None, received_at: float, source: str) -> int:
        """Publish one upstream record unless it is bad or a duplicate (a live one after
        closing the gap before it, if any); 1 if it was valid, 0 if dead-lettered."""
        self.received += 1
        self._received.inc()
        try:
            event = nav_tick(record, source=source, expected_symbol=self.symbol)
        except BadRecord as exc:
            text = raw if raw is not None else _dumps(record)
            await self._dead_letter(text, exc, self.name if source == SOURCE_WS else REST_SOURCE)
            return 0
        ts: int = event.data["timestamp"]
        mark = self._book.get(self.symbol)
        if mark is not None:
            if ts <= mark:
                self._duplicate()
                return 1
            if source == SOURCE_WS and ts - mark > self._gap_after:
                mark = await self._close_gap(mark, ts)
            self._gap_after = (ts - mark) * 3 // 2
        await self._publisher.publish(event, received_at=received_at)
        self._book.advance(self.symbol, ts)
        self.published += 1
        return 1

    async def _dead_letter(self, raw: bytes | str, exc: BadRecord, source: str) -> None:
        self.bad_records += 1
        await self._publisher.dead_letter(
            source=source,
            raw=raw,
            reason=exc.reason,
            detail=exc.detail,
            key=self.symbol,
            event_type=NAV_TICK,
        )
