"""Vinter NAV over WebSocket: one socket per symbol, onto Kafka, gaps back-filled from REST.

A session is one socket, from connect to end (the supervisor retries); the sockets live in
one child process of the receiver worker (`nav_receiver`). `docs/design.md` ("NAV over
WebSocket") says why: back-fill bounds, gap checks, revisions, backpressure, secrets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from bridge import metrics
from bridge.config import VinterSettings
from bridge.errors import AuthError, BadRecord, ConfigError, UpstreamError
from bridge.freshness import BOARD, Row
from bridge.marks import MarkBook
from bridge.normalize.nav import decode_records, frequency_of, timestamp_of
from bridge.sink.nav import GapRule, NavSink
from bridge.sources.nav_receiver import SocketEnd
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridge.sources.vinter_rest import VinterRest
from bridge.sources.worker import Channel, Ended, Worker

if TYPE_CHECKING:
    from bridge.publish import EventSink  # the sink's: this module sends nothing itself
from bridge.supervisor import Progress

__all__ = ["STALE_AFTER_S", "NavSocketSource"]

log = logging.getLogger(__name__)

#: A start from REST further ahead of the clock than this is bad data: every live record
#: would fall below it.
START_AHEAD_MAX_MS: Final = 86_400_000

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
#: Messages buffered per socket before websockets stops reading the TCP stream (back-fill
#: and slow Kafka both rely on it). Idle sockets hold none.
MAX_QUEUE_MESSAGES: Final = 16


def source_name(symbol: str) -> str:
    return f"vinter.nav:{symbol}"


def stale_after_s(symbol: str, settings: VinterSettings) -> float:
    """Silence that ends a session (`vinter.stale_after_s`, or by frequency)."""
    return settings.stale_after_s or STALE_AFTER_S[frequency_of(symbol)]


def freshness_row(symbol: str, settings: VinterSettings) -> Row:
    """The symbol's row on the freshness board (the service makes every configured one)."""
    return BOARD.row(
        "nav", symbol, source=source_name(symbol), stale_after_s=stale_after_s(symbol, settings)
    )


class NavSocketSource:
    """The NAV WebSocket of one symbol, as a supervised source named `vinter.nav:{symbol}`.

    `book` (the NAV topic's marks, recovered from Kafka), `rest` (for back-fill) and
    `receiver` (the worker whose child holds the sockets: `nav_receiver.nav_worker`) are
    shared by every NAV socket.
    """

    def __init__(
        self,
        symbol: str,
        settings: VinterSettings,
        publisher: EventSink,
        book: MarkBook,
        rest: VinterRest,
        *,
        receiver: Worker,
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
        self.name = source_name(symbol)
        self._shown_url = f"{settings.ws_url}/ws/nav/{quote(symbol, safe='')}/"
        self._url = f"{self._shown_url}?token={quote(token, safe='')}"
        self._settings = settings
        self._book = book
        self._rest = rest
        self._receiver = receiver
        self._sink = NavSink(
            symbol,
            self.name,
            publisher,
            book,
            gaps=GapRule(self.frequency, int(settings.gap_floor_s * 1000)),
            gap_check_interval_s=settings.gap_check_interval_s,
            backfill=self._fill,
            freshness=freshness_row(symbol, settings),
        )
        self._options = {
            "open_timeout": open_timeout_s,
            "ping_interval": settings.ping_interval_s,
            "ping_timeout": settings.ping_interval_s,
            "close_timeout": CLOSE_TIMEOUT_S,
            "max_size": settings.max_message_bytes,
            "max_queue": MAX_QUEUE_MESSAGES,
        }
        self.stale_after_s = stale_after_s(symbol, settings)
        self._window_ms = BACKFILL_WINDOW_MS[self.frequency]
        self._waiting_since: float | None = None  # set while the session waits on the socket
        self._received = metrics.RECEIVED.labels(self.name)
        self.sessions = 0
        self.received = 0
        self.backfilled = 0

    def __repr__(self) -> str:
        return f"NavSocketSource({self.symbol!r}, ws_url={self._settings.ws_url!r})"

    @property
    def published(self) -> int:
        return self._sink.published

    @property
    def duplicates(self) -> int:
        return self._sink.duplicates

    @property
    def revisions(self) -> int:
        return self._sink.revisions

    @property
    def bad_records(self) -> int:
        return self._sink.bad_records

    @property
    def gap_checks(self) -> int:
        return self._sink.gap_checks

    # -- one session -----------------------------------------------------------------------

    async def session(self, progress: Progress) -> None:
        """Connect, back-fill the gap since the mark, then publish live until the end."""
        self.sessions += 1
        if self._book.get(self.symbol) is None:
            await self._start()
        sock = await self._open()
        try:
            progress.up()
            await self._backfill()
            await self._watched(sock, progress)
        finally:
            sock.close()

    async def _open(self) -> Channel:
        spec = {"url": self._url, "options": self._options, "symbol": self.symbol}
        try:
            return await self._receiver.open(spec)
        except Ended as ended:
            error = SocketEnd.of(ended)
        # Raised outside the handler, so the error has no __context__.
        raise error.as_error(self.name, self.symbol, self._shown_url)

    # -- back-fill -------------------------------------------------------------------------

    async def _start(self) -> None:
        """A symbol never published starts after REST's newest record: a mark committed
        before the socket opens, so a holder that dies before its first commit leaves the
        next one a place to back-fill from."""
        try:
            newest = timestamp_of(await self._rest.latest(self.frequency, self.symbol))
        except AuthError:
            raise
        except (BadRecord, UpstreamError) as exc:  # the first live record will mark the start
            log.warning("%s: no start from REST (%s); starting at the live feed", self.name, exc)
            return
        if newest is not None and newest > time.time() * 1000 + START_AHEAD_MAX_MS:
            log.warning("%s: REST's newest record %d is a day ahead: ignored", self.name, newest)
        elif newest is not None:
            await self._sink.begin_after(newest)

    async def _backfill(self) -> None:
        """Publish from REST what the upstream produced after the mark."""
        mark = self._book.get(self.symbol)
        if mark is not None:
            await self._fill(mark, None)

    async def _fill(self, mark: int, end: int | None) -> None:
        """Publish from REST, in timestamp order, the records after `mark` and before `end`
        (None: up to the upstream's newest record). Raises `UpstreamError` if REST fails."""
        freshness = self._sink.freshness
        freshness.backfilling = True
        try:
            await self._fill_from_rest(mark, end)
        finally:
            freshness.backfilling = False

    async def _fill_from_rest(self, mark: int, end: int | None) -> None:
        done = 0
        try:
            if end is None:
                newest = timestamp_of(await self._rest.latest(self.frequency, self.symbol))
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
                published = await self._backfilled(records)
                done += published
                self.backfilled += published
                start = stop
        except BadRecord as exc:
            # The REST body itself is unreadable: keep it for inspection, retry later.
            if exc.raw is not None:
                await self._sink.dead_letter(exc.raw, exc, REST_SOURCE)
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

    async def _backfilled(self, records: list[Any]) -> int:
        """Publish one REST window (one record per timestamp: the newest version); returns
        how many events it published."""
        received_at = time.monotonic()
        before = self.published
        self.received += len(records)
        self._received.inc(len(records))
        decoded, refused = decode_records(records, self.symbol)
        await self._sink.page(decoded, refused, received_at, source=REST_SOURCE)
        return self.published - before

    def _backfill_failed(self, done: int, why: str) -> None:
        log.warning(
            "%s: back-fill from REST failed after %d records (%s); live records are held "
            "upstream until a later session fills the gap from the mark",
            self.name,
            done,
            why,
        )

    # -- live ------------------------------------------------------------------------------

    async def _watched(self, sock: Channel, progress: Progress) -> None:
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

    async def _read(self, sock: Channel, progress: Progress) -> None:
        # Everything the receiver queued, taken at once and handed to the sink in one call.
        read = sock.read
        monotonic = time.monotonic
        delivered = progress.delivered
        received = self._received.inc
        take = self._sink.take
        name = self.name
        while True:
            self._waiting_since = monotonic()
            try:
                batch = await read()
            except Ended as ended:
                error = SocketEnd.of(ended)
                break
            self._waiting_since = None
            self.received += len(batch)
            received(len(batch))
            delivered(await take(batch, source=name))  # refusals are not deliveries
        if error.too_large is not None:
            await self._too_large(error.too_large)
        if not error.ok:  # raised outside the handler, so the error has no __context__
            raise UpstreamError(self.name, error.reason)

    async def _too_large(self, size: int) -> None:
        """The socket was closed (1009) on a message over `vinter.max_message_bytes`."""
        limit = self._settings.max_message_bytes
        detail = (
            f"a WebSocket message of at least {size} bytes, over vinter.max_message_bytes "
            f"({limit}): the socket was closed (1009) and reopens; its records come back "
            "through the REST back-fill"
        )
        log.warning("%s: %s", self.name, detail)
        metrics.TOO_LARGE.labels(self.name).inc()
        await self._sink.dead_letter(b"", BadRecord("too_large", detail), self.name)
