"""A local simulator of the Vinter NAV APIs: REST (daily, hourly, real-time) and WebSocket.

One aiohttp server on one port serves both, so one base URL covers everything:

* ``GET /ws/nav/{symbol}/?token=…`` (trailing slash optional): a live feed of one symbol.
  Bad or missing token: the handshake gets HTTP 401; unknown symbol: HTTP 404. Nothing is
  replayed on connect: only records appended after the handshake are sent. Each message is
  one JSON record, or with ``ws_batch = N`` a JSON array of up to N records.
* ``GET /api/v3/nav_daily/``, ``/api/v3/nav_hourly/``, ``/api/v3/nav_real_time/`` (trailing
  slash optional), header ``Authorization: <api key>`` (the raw key, as documented).
  Errors are ``{"result": "error", "message": …}``: 401 bad/missing key, 400 missing
  ``symbol`` or bad ``limit``/time, 404 unknown symbol (also a symbol of another frequency).
  Success is ``{"result": "success", "message": "Success", "data": […], "params": {…}}``
  where ``params`` echoes the recognised query parameters as given (strings).

Where the vendor pages are silent, the simulator chooses:

* Without ``limit`` exactly one record comes back: the latest (of the range, if one is given).
* ``limit`` without a range: the latest ``limit`` records. ``limit`` with ``start_time``
  and/or ``end_time``: the first ``limit`` records of the range in ascending time, so a
  client pages forward by moving ``start_time`` past the last ``timestamp`` it received.
  ``limit`` above 2000 is capped at 2000.
* With ``shuffle`` on (the default) ``data`` is in random order, and never ascending when it
  holds two or more records: clients must sort by ``timestamp``.
* Bad input of any shape: :meth:`VinterSim.send_raw` puts one message, exactly as given (a
  ``str`` as a text frame, ``bytes`` as a binary frame), on a symbol's open sockets, in order
  with its records; each entry of ``rest_raw[frequency]`` (a body, or a body and headers
  such as ``Content-Encoding: gzip``) is served verbatim (HTTP 200) as the body of the next
  request to that frequency's REST endpoint.
* Large records: ``append(symbol, n, extra_bytes=N)`` gives each record a field the client
  does not know (``note``) of N random characters, which do not compress.
* Irregular real-time timestamps: with ``jitter_ms`` each real-time record's timestamp lies
  up to that much after its slot (less than a step, so records stay in order).
* Error bodies: a ``rest_fail`` entry ``(status, headers, body)`` answers with that body,
  as an upstream that quotes the request back in its errors would.
* Fault messages (``malformed_every``, ``invalid_every``) are extra messages: the record is
  still sent in its own valid message right after (unless a drop cuts the socket first).
* A clean drop sends a close frame (``drop_code``, default 1001); an abrupt one aborts the
  TCP connection without a close frame (the client sees 1006).
* With ``stall`` set sockets stay open but nothing at all is sent: no records, no pongs, no
  reply to a client's close frame. Records appended meanwhile are not queued for them.
* Holes: ``skip(symbol, n)`` lets the next slots pass with no record at all, live or in REST.
* The access log is off: the WebSocket token travels in the query string.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hmac
import os
import random
import re
import secrets
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from types import TracebackType
from typing import Literal, Self

import orjson
from aiohttp import WSMsgType, web

from bridgedev.sim.vinter_data import (
    Frequency,
    IdAllocator,
    Record,
    Series,
    SimClock,
    parse_time_param,
    to_ms,
)

__all__ = ["MAX_RECORDS", "Frequency", "Record", "SimClock", "VinterSim", "main"]

MAX_RECORDS = 2000

DropMode = Literal["clean", "abrupt"]
RestFault = (
    int | str | tuple[int | str, Mapping[str, str]] | tuple[int | str, Mapping[str, str], bytes]
)
RawBody = bytes | tuple[bytes, Mapping[str, str]]
WsReject = int | tuple[int, Mapping[str, str]]

REST_PATHS: Mapping[Frequency, str] = {
    Frequency.DAILY: "/api/v3/nav_daily/",
    Frequency.HOURLY: "/api/v3/nav_hourly/",
    Frequency.REAL_TIME: "/api/v3/nav_real_time/",
}

_LIMIT = re.compile(r"[0-9]+")
_ECHOED = ("symbol", "limit", "start_time", "end_time")
_VALUE_KEYS = ("close", "value")


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Raw:
    message: str | bytes


@dataclass(frozen=True)
class _Drop:
    mode: DropMode
    code: int


@dataclass(eq=False)
class _Conn:
    symbol: str
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    queue: asyncio.Queue[Record | _Drop | _Raw] = field(default_factory=asyncio.Queue)
    open: bool = False
    dropping: bool = False
    sent: int = 0
    invalid_sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def request_drop(self, drop: _Drop) -> None:
        self.dropping = True
        while not self.queue.empty():
            self.queue.get_nowait()
        if drop.mode == "abrupt":
            self.abort()
        self.queue.put_nowait(drop)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


def _split_fault(fault: RestFault | WsReject) -> tuple[int | str, Mapping[str, str]]:
    if isinstance(fault, tuple):
        return fault[0], fault[1]
    return fault, {}


def _fault_response(
    fault: RestFault,
) -> tuple[web.Response | None, str | None, Mapping[str, str]]:
    """The answer to a request that meets `fault`: an error response, or none and how to
    cut the real answer (`truncated`, `truncated_json`), with the headers to send."""
    if isinstance(fault, tuple) and len(fault) == 3:
        code, extra, text = fault
        return web.Response(status=int(code), body=text, headers=extra), None, {}
    status, headers = _split_fault(fault)
    if status in ("truncated", "truncated_json"):
        return None, str(status), headers
    if isinstance(status, int):
        return _error(status, f"simulated HTTP {status}", headers), None, headers
    return _error(500, f"unknown simulated fault {status!r}"), None, headers


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    body = orjson.dumps({"result": "error", "message": message})
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def _invalid_variant(record: Record, variant: int) -> Record:
    """A well-formed JSON record that breaks the schema, four ways in turn."""
    bad = dict(record)
    if variant % 4 == 0:
        bad["timestamp"] = str(bad["timestamp"])
    elif variant % 4 == 1:
        bad.pop("symbol", None)
    elif variant % 4 == 2:
        for key in _VALUE_KEYS:
            if key in bad:
                bad[key] = "n/a"
    else:
        bad.pop("timestamp", None)
    return bad


class VinterSim:
    """The simulator: ``async with VinterSim(symbols=[…], token=…, api_key=…) as sim``.

    History is per symbol, deterministic from ``seed`` and ``clock``. ``history_days`` of
    official records are pre-built before the clock's start (at most ``history_cap`` per
    symbol). With ``rate > 0`` every symbol gets ``rate`` new records per wall-clock second;
    new records are stored whether or not a socket listens, and pushed to open sockets.
    """

    def __init__(
        self,
        symbols: Sequence[str],
        *,
        token: str,
        api_key: str,
        rate: float = 0.0,
        history_days: int = 0,
        history_cap: int = 5000,
        seed: int = 0,
        clock: SimClock | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        shuffle: bool = True,
        ws_batch: int | None = None,
        jitter_ms: int = 0,
    ) -> None:
        if not symbols:
            raise ValueError("at least one symbol is needed")
        if history_days < 0 or history_cap < 0:
            raise ValueError("history_days and history_cap must be >= 0")
        self.token = token
        self.api_key = api_key
        self.clock = clock if clock is not None else SimClock()
        self.host = host
        self._port = port
        self._ids = IdAllocator()
        self._series: dict[str, Series] = {}
        for symbol in symbols:
            if symbol in self._series:
                raise ValueError(f"duplicate symbol {symbol!r}")
            series = Series(symbol, seed=seed, clock=self.clock, ids=self._ids, jitter_ms=jitter_ms)
            per_day = max(0, 86_400_000 // self.clock.step_ms(series.freq))
            series.prebuild(min(history_days * per_day, history_cap))
            self._series[symbol] = series
        self._emitted: dict[str, list[Record]] = {symbol: [] for symbol in symbols}
        self._conns: dict[str, set[_Conn]] = {symbol: set() for symbol in symbols}
        self._shuffle_rng = random.Random(f"vinter-shuffle:{seed}")

        # Knobs: plain attributes, read at the moment they matter.
        self.rate: float = rate
        self.shuffle: bool = shuffle
        self.ws_batch: int | None = ws_batch
        self.drop_after: int | None = None
        self.drop_mode: DropMode = "clean"
        self.drop_code: int = 1001
        self.malformed_every: int | None = None
        self.invalid_every: int | None = None
        self.rest_fail: list[RestFault] = []
        #: Per endpoint, bodies served verbatim (HTTP 200, application/json) as its next
        #: answers, one per request (after any ``rest_fail`` fault): bad input for clients.
        self.rest_raw: dict[Frequency, list[RawBody]] = {freq: [] for freq in Frequency}
        self.ws_reject: list[WsReject] = []
        self.accept_then_close: bool = False
        self._stall = False
        self._unstalled = asyncio.Event()
        self._unstalled.set()

        # Counters.
        self.ws_attempts = 0
        #: ``(time.monotonic(), symbol)`` of every handshake attempt, refused ones included:
        #: tests measure reconnect delays and attempt rates from it.
        self.ws_attempt_times: list[tuple[float, str]] = []
        self.ws_connects = 0
        #: The most WebSocket connections ever open at once, per symbol: a subscription held
        #: by two replicas at a time shows as 2.
        self.peak_sockets: Counter[str] = Counter()
        self.ws_handshake_rejects = 0
        self.ws_messages = 0
        self.rest_requests: Counter[str] = Counter()

        self._changed = asyncio.Condition()
        self._emit_waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self._runner: web.AppRunner | None = None
        self._emitter: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        if self._closed:
            raise RuntimeError("a closed VinterSim cannot be restarted")
        if self._runner is not None:
            return
        app = web.Application()
        for freq, path in REST_PATHS.items():
            handler = self._rest_handler(freq, path)
            app.router.add_get(path, handler, allow_head=False)
            app.router.add_get(path.rstrip("/"), handler, allow_head=False)
        app.router.add_get("/ws/nav/{symbol}/", self._ws_handler, allow_head=False)
        app.router.add_get("/ws/nav/{symbol}", self._ws_handler, allow_head=False)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self._port)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])
        self._emitter = asyncio.create_task(self._emit_loop(), name="vinter-sim-emitter")

    async def close(self) -> None:
        """Stop emitting, close every socket (1001) and the server. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._emitter is not None:
            self._emitter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._emitter
        await self.drop_all("clean", code=1001)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def port(self) -> int:
        if self._runner is None:
            raise RuntimeError("the simulator is not started")
        return self._port

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def symbol_ws_url(self, symbol: str) -> str:
        """The socket URL of a symbol, without the token (add ``?token=…`` yourself)."""
        return f"{self.ws_url}/ws/nav/{symbol}/"

    @property
    def symbols(self) -> tuple[str, ...]:
        return tuple(self._series)

    # -- knobs that need a wake-up ---------------------------------------------------------

    @property
    def stall(self) -> bool:
        return self._stall

    @stall.setter
    def stall(self, value: bool) -> None:
        self._stall = value
        if value:
            self._unstalled.clear()
        else:
            self._unstalled.set()

    # -- driving the data ------------------------------------------------------------------

    def append(self, symbol: str, n: int = 1, *, extra_bytes: int = 0) -> list[Record]:
        """Append ``n`` official records to ``symbol`` now and push them to its sockets
        (each with a ``note`` of ``extra_bytes`` random characters, if given)."""
        if n < 0:
            raise ValueError("n must be >= 0")
        series = self._get(symbol)
        records = [series.next_official(extra_bytes) for _ in range(n)]
        self._push(symbol, records)
        return [dict(r) for r in records]

    def skip(self, symbol: str, n: int = 1) -> list[int]:
        """Let the next ``n`` slots of ``symbol`` pass with no record at all, on the socket
        or in REST (an upstream that never produced them): a hole a completeness check must
        name. Returns the slots skipped (Unix ms)."""
        series = self._get(symbol)
        return [self.clock.tick(series.symbol) for _ in range(n)]

    def add_unofficial(
        self,
        symbol: str,
        *,
        at: datetime | None = None,
        push: bool = True,
        **fields: int | float | str,
    ) -> Record:
        """Store an ``id == 0`` record (default slot: the next one, which a later
        :meth:`append` fills with the official record, replacing it). ``fields`` override
        generated values."""
        series = self._get(symbol)
        record = series.unofficial(None if at is None else to_ms(at), fields)
        if push:
            self._push(symbol, [record])
        return dict(record)

    def correct(
        self,
        symbol: str,
        day: date | str,
        *,
        close: float,
        updated_at: datetime | None = None,
        push: bool = True,
    ) -> Record:
        """Upstream correction of a daily record: new ``close`` (``high``/``low`` widened to
        include it) and a later ``updated_at`` (default: now, or 1 ms after the previous)."""
        series = self._get(symbol)
        wanted = date.fromisoformat(day) if isinstance(day, str) else day
        record = series.correct(wanted, float(close), updated_at)
        if push:
            self._push(symbol, [record])
        return dict(record)

    def history(self, symbol: str) -> list[Record]:
        """The current state of the symbol, ascending: pre-built and appended records,
        corrections applied, unofficial records not yet replaced. This is what REST serves."""
        return [dict(r) for r in self._get(symbol).records]

    def emitted(self, symbol: str) -> list[Record]:
        """Every record pushed for the symbol, in push order, as it was when pushed
        (appends, unofficial records, corrections; not the pre-built history)."""
        return [dict(r) for r in self._emitted[self._get(symbol).symbol]]

    async def wait_emitted(self, symbol: str, count: int, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` records have been pushed for ``symbol``."""
        if len(self._emitted[self._get(symbol).symbol]) >= count:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (symbol, count, waiter)
        self._emit_waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        finally:
            self._emit_waiters.remove(entry)

    # -- sockets ---------------------------------------------------------------------------

    def send_raw(self, symbol: str, message: str | bytes) -> int:
        """Send ``message`` as it is on every open socket of ``symbol``, after the records
        already queued for it (bad input of any shape). Returns how many sockets got it."""
        self._get(symbol)
        if self._stall:
            return 0
        conns = [c for c in self._conns[symbol] if c.open and not c.dropping]
        for conn in conns:
            conn.queue.put_nowait(_Raw(message))
        return len(conns)

    def open_sockets(self, symbol: str | None = None) -> int:
        """Open WebSocket connections (of one symbol, or all)."""
        groups = self._conns.values() if symbol is None else [self._conns[symbol]]
        return sum(1 for conns in groups for c in conns if c.open and not c.dropping)

    async def wait_sockets(
        self, n: int = 1, symbol: str | None = None, timeout: float = 5.0
    ) -> None:
        """Wait until at least ``n`` sockets (of ``symbol``, or all) are open."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.open_sockets(symbol) >= n)

    async def drop_all(self, mode: DropMode = "clean", code: int | None = None) -> int:
        """Drop every open socket now; returns how many. Waits (briefly) until they are gone."""
        conns = [c for group in self._conns.values() for c in group]
        drop = _Drop(mode, self.drop_code if code is None else code)
        for conn in conns:
            conn.request_drop(drop)
        waits = [asyncio.create_task(c.done.wait()) for c in conns]
        if waits:
            _, pending = await asyncio.wait(waits, timeout=2.0)
            for task in pending:
                task.cancel()
            for conn in conns:
                if not conn.done.is_set():
                    conn.abort()
        return len(conns)

    # -- internals -------------------------------------------------------------------------

    def _get(self, symbol: str) -> Series:
        try:
            return self._series[symbol]
        except KeyError:
            raise KeyError(f"unknown symbol {symbol!r}") from None

    def _push(self, symbol: str, records: list[Record]) -> None:
        emitted = self._emitted[symbol]
        emitted.extend(records)
        for name, count, waiter in self._emit_waiters:
            if name == symbol and len(emitted) >= count and not waiter.done():
                waiter.set_result(None)
        if self._stall:
            return
        for conn in self._conns[symbol]:
            if not conn.dropping:
                for record in records:
                    conn.queue.put_nowait(record)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _emit_loop(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        credit = 0.0
        while True:
            rate = self.rate
            await asyncio.sleep(0.05 if rate <= 0 else max(0.005, min(0.05, 1.0 / rate)))
            now = loop.time()
            credit = credit + (now - last) * self.rate if self.rate > 0 else 0.0
            last = now
            n = min(int(credit), 10_000)
            credit -= int(credit)
            if n:
                for symbol in self._series:
                    self.append(symbol, n)

    # -- REST ------------------------------------------------------------------------------

    def _rest_handler(
        self, freq: Frequency, path: str
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._rest(request, freq, path)

        return handler

    async def _rest(self, request: web.Request, freq: Frequency, path: str) -> web.StreamResponse:
        self.rest_requests[path] += 1
        truncate: str | None = None
        headers: Mapping[str, str] = {}
        if self.rest_fail:
            failed, truncate, headers = _fault_response(self.rest_fail.pop(0))
            if failed is not None:
                return failed
        response = self._answer(request, freq)
        if truncate is None or response.status != 200:
            return response
        body = response.body
        if not isinstance(body, bytes):
            return response
        if truncate == "truncated_json":
            return web.Response(
                status=200,
                body=body[: len(body) // 2],
                content_type="application/json",
                headers=headers,
            )
        # Declare the whole length, send half, then cut the connection.
        stream = web.StreamResponse(status=200, headers=headers)
        stream.content_type = "application/json"
        stream.content_length = len(body)
        await stream.prepare(request)
        await stream.write(body[: len(body) // 2])
        if request.transport is not None:
            request.transport.abort()
        return stream

    def _answer(self, request: web.Request, freq: Frequency) -> web.Response:
        if self.rest_raw[freq]:
            raw = self.rest_raw[freq].pop(0)
            content, extra = raw if isinstance(raw, tuple) else (raw, {})
            return web.Response(
                status=200, body=content, content_type="application/json", headers=extra
            )
        try:
            data, params = self._query(request, freq)
        except _HttpError as exc:
            return _error(exc.status, exc.message)
        if self.shuffle and len(data) > 1:
            self._shuffle_rng.shuffle(data)
            stamps = [int(r["timestamp"]) for r in data]
            if stamps == sorted(stamps):
                data.reverse()
        body = {"result": "success", "message": "Success", "data": data, "params": params}
        return web.Response(status=200, body=orjson.dumps(body), content_type="application/json")

    def _query(self, request: web.Request, freq: Frequency) -> tuple[list[Record], dict[str, str]]:
        key = request.headers.get("Authorization")
        if key is None:
            raise _HttpError(401, "Authentication credentials were not provided.")
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            raise _HttpError(401, "Invalid API key.")
        query = request.query
        params = {name: query[name] for name in _ECHOED if name in query}
        symbol = query.get("symbol", "")
        if not symbol:
            raise _HttpError(400, "The symbol parameter is required.")
        limit: int | None = None
        if "limit" in query:
            text = query["limit"]
            if not _LIMIT.fullmatch(text) or int(text) <= 0:
                raise _HttpError(400, f"limit must be a positive integer, got {text!r}.")
            limit = min(int(text), MAX_RECORDS)
        bounds: dict[str, int] = {}
        for name in ("start_time", "end_time"):
            if name in query:
                try:
                    bounds[name] = parse_time_param(query[name])
                except ValueError as exc:
                    raise _HttpError(400, f"{name}: {exc}") from None
        series = self._series.get(symbol)
        if series is None or series.freq is not freq:
            raise _HttpError(404, f"Symbol {symbol} not found.")
        selected = series.select(bounds.get("start_time"), bounds.get("end_time"))
        if limit is None:
            chosen = selected[-1:]
        elif bounds:
            chosen = selected[:limit]
        else:
            chosen = selected[-limit:]
        return [dict(r) for r in chosen], params

    # -- WebSocket -------------------------------------------------------------------------

    async def _ws_handler(self, request: web.Request) -> web.StreamResponse:
        self.ws_attempts += 1
        self.ws_attempt_times.append((time.monotonic(), request.match_info["symbol"]))
        if self.ws_reject:
            status, headers = _split_fault(self.ws_reject.pop(0))
            self.ws_handshake_rejects += 1
            return _error(int(status), f"simulated HTTP {status}", headers)
        token = request.query.get("token")
        if token is None or not hmac.compare_digest(token.encode(), self.token.encode()):
            self.ws_handshake_rejects += 1
            return _error(401, "Invalid or missing token.")
        symbol = request.match_info["symbol"]
        if symbol not in self._series:
            self.ws_handshake_rejects += 1
            return _error(404, f"Symbol {symbol} not found.")
        ws: web.WebSocketResponse = web.WebSocketResponse(autoping=False, autoclose=False)
        if not ws.can_prepare(request).ok:
            self.ws_handshake_rejects += 1
            return _error(400, "Expected a WebSocket upgrade request.")
        conn = _Conn(symbol=symbol, ws=ws, transport=request.transport)
        # Registered before the 101 goes out: a record appended once the client holds an
        # open socket is never missed.
        self._conns[symbol].add(conn)
        try:
            await ws.prepare(request)
            self.ws_connects += 1
            if self.accept_then_close:
                await ws.close(code=self.drop_code)
                return ws
            conn.open = True
            held = sum(1 for c in self._conns[symbol] if c.open)
            self.peak_sockets[symbol] = max(self.peak_sockets[symbol], held)
            await self._notify()
            await self._serve(conn)
        finally:
            self._conns[symbol].discard(conn)
            conn.open = False
            conn.done.set()
            with contextlib.suppress(Exception):
                await self._notify()
        return ws

    async def _serve(self, conn: _Conn) -> None:
        reader = asyncio.create_task(self._ws_reader(conn))
        writer = asyncio.create_task(self._ws_writer(conn))
        try:
            await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (reader, writer):
                task.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
            if not conn.ws.closed:
                with contextlib.suppress(Exception):
                    await conn.ws.close(code=1001)

    async def _ws_reader(self, conn: _Conn) -> None:
        ws = conn.ws
        while True:
            msg = await ws.receive()
            if msg.type is WSMsgType.PING:
                if not self._stall:
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await ws.pong(msg.data)
            elif msg.type is WSMsgType.CLOSE:
                await self._unstalled.wait()
                code = msg.data if isinstance(msg.data, int) else 1000
                if not (code in (1000, 1001) or 1007 <= code <= 1014 or 3000 <= code < 5000):
                    code = 1000
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await ws.close(code=code)
                return
            elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                return

    async def _ws_writer(self, conn: _Conn) -> None:
        while True:
            item = await conn.queue.get()
            if isinstance(item, _Drop):
                await self._drop(conn, item)
                return
            if isinstance(item, _Raw):
                if not self._stall and not await self._send_text(conn, item.message):
                    return
                continue
            batch = [item]
            pending: _Drop | _Raw | None = None
            size = self.ws_batch
            while size and len(batch) < size and not conn.queue.empty():
                more = conn.queue.get_nowait()
                if isinstance(more, _Drop | _Raw):
                    pending = more
                    break
                batch.append(more)
            if not self._stall:
                payload: Record | list[Record] = batch if size else batch[0]
                if not await self._send_data(conn, payload):
                    return
            if isinstance(pending, _Raw):
                if not self._stall and not await self._send_text(conn, pending.message):
                    return
            elif pending is not None:
                await self._drop(conn, pending)
                return

    async def _send_data(self, conn: _Conn, payload: Record | list[Record]) -> bool:
        text = orjson.dumps(payload).decode()
        position = conn.sent + 1
        extra: str | None = None
        if self.malformed_every and position % self.malformed_every == 0:
            extra = text[: len(text) // 2]
        elif self.invalid_every and position % self.invalid_every == 0:
            first = payload[0] if isinstance(payload, list) else payload
            bad = _invalid_variant(first, conn.invalid_sent)
            conn.invalid_sent += 1
            extra = orjson.dumps([bad] if isinstance(payload, list) else bad).decode()
        if extra is not None and not await self._send_text(conn, extra):
            return False
        return await self._send_text(conn, text)

    async def _send_text(self, conn: _Conn, text: str | bytes) -> bool:
        if conn.dropping:
            return False
        try:
            if isinstance(text, bytes):
                await conn.ws.send_bytes(text)
            else:
                await conn.ws.send_str(text)
        except (ConnectionError, RuntimeError):
            return False
        conn.sent += 1
        self.ws_messages += 1
        if self.drop_after and conn.sent >= self.drop_after:
            conn.dropping = True
            await self._drop(conn, _Drop(self.drop_mode, self.drop_code))
            return False
        return True

    async def _drop(self, conn: _Conn, drop: _Drop) -> None:
        conn.dropping = True
        if drop.mode == "abrupt":
            conn.abort()
            return
        with contextlib.suppress(ConnectionError, RuntimeError, asyncio.TimeoutError):
            await conn.ws.close(code=drop.code)


# -- command line --------------------------------------------------------------------------


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bridgedev.sim.vinter", description="Run the Vinter NAV simulator."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--symbols",
        default="vnfa-btca-15-d,vnfa-btca-15-h,vnfa-btca-15-r",
        help="comma-separated symbols ending in -d, -h or -r",
    )
    parser.add_argument("--rate", type=float, default=1.0, help="records per second per symbol")
    parser.add_argument("--history-days", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--token",
        default=os.environ.get("VINTER_SIM_TOKEN"),
        help="WebSocket token (default: $VINTER_SIM_TOKEN or a random one)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("VINTER_SIM_API_KEY"),
        help="REST API key (default: $VINTER_SIM_API_KEY or a random one)",
    )
    return parser.parse_args(argv)


async def _run(args: argparse.Namespace) -> None:
    symbols = [s.strip() for s in args.symbols.split(",") if s.strip()]
    token = args.token or secrets.token_urlsafe(16)
    api_key = args.api_key or secrets.token_urlsafe(16)
    async with VinterSim(
        symbols,
        token=token,
        api_key=api_key,
        rate=args.rate,
        history_days=args.history_days,
        seed=args.seed,
        host=args.host,
        port=args.port,
    ) as sim:
        out = sys.stdout
        out.write(f"base url: {sim.base_url}\n")
        for freq, path in REST_PATHS.items():
            out.write(f"  REST {freq.name.lower():<9} {sim.base_url}{path}?symbol=…\n")
        for symbol in sim.symbols:
            out.write(f"  WS   {symbol}: {sim.symbol_ws_url(symbol)} (add ?token=)\n")
        if not args.token:
            out.write(f"token (random, pass as ?token=): {token}\n")
        if not args.api_key:
            out.write(f"api key (random, pass as Authorization header): {api_key}\n")
        out.write("running; Ctrl-C to stop\n")
        out.flush()
        await asyncio.Event().wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
