"""A local simulator of Kaiko's ``aggregates_vwap_v1`` gRPC stream.

It serves ``kaikosdk.StreamAggregatesVWAPServiceV1/Subscribe`` (registered through the
SDK's generated ``add_StreamAggregatesVWAPServiceV1Servicer_to_server``) over TLS on
``127.0.0.1``, like the real gateway, so a client uses exactly the production set-up:
``ssl_channel_credentials`` (here with the simulator's CA) composed with
``access_token_call_credentials``.

Behaviour, following the vendor docs and the 1.40 protos:

* ``authorization`` metadata must be ``Bearer <api_key>``, else ``UNAUTHENTICATED``.
* ``instrument_criteria`` fields are matched against a fixed universe of
  ``(exchange, instrument_class, code)``; a field equal to ``*`` matches anything, any
  other value must match exactly (case-sensitive, no partial patterns). An empty field, or
  an ``aggregate`` outside the supported set, is ``INVALID_ARGUMENT``. A request that
  matches nothing keeps the stream open and silent, like a live feed with no data.
* Each matched instrument has a simulated clock per aggregate, shared by all streams: every
  emission is the next interval. ``uid`` is the interval start (RFC 3339, seconds,
  ``Z``), ``ts_event`` is a nanosecond timestamp a fraction of a second after the interval
  ends, ``price`` a multiplicative random walk, ``sequence_id`` empty. Streams round-robin
  over their matched instruments. The simulated clock is driven by emissions, not by wall
  time: at ``rate=100`` over one ``1s`` instrument, one wall second covers 100 intervals.
* VWAP has no replay: a new stream carries on from where each instrument's clock is.
  ``resend_on_reconnect=N`` makes a new stream first repeat the last ``N`` intervals of
  each instrument (the client must de-duplicate them).
* Intervals generated for one stream are kept (``history`` of them per instrument) so that
  overlapping streams see the same values for the same ``uid``. An interval whose write
  was cut off by a disconnect is lost (and not recorded), as on a live feed.
* Response headers are sent as soon as a subscription is accepted, before any data.

Fault knobs (all may be changed while streams are running): :meth:`KaikoSim.abort_after`,
:meth:`KaikoSim.abort_next`, :meth:`KaikoSim.fail_subscribe`, :meth:`KaikoSim.stall`,
:meth:`KaikoSim.unstall`, :meth:`KaikoSim.close_connections`, :meth:`KaikoSim.clear_faults`.
Bad input: :meth:`KaikoSim.inject` queues response messages of any content.

Everything the simulator delivered is recorded per stream in :attr:`KaikoSim.streams`.

Command line (the API key is read from an environment variable and never printed)::

    KAIKO_API_KEY=... python -m bridgedev.sim.kaiko --port 50051 --rate 100 \\
        --instrument cbse:spot:btc-usd --instrument binc:spot:eth-usdt --ca-out ca.pem

Needs the ``sim`` extra (``trustme``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hmac
import math
import os
import random
import re
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, NamedTuple, Self

import grpc
from kaikosdk import sdk_pb2_grpc
from kaikosdk.stream.aggregates_vwap_v1 import response_pb2

from bridgedev.sim.tls import TestCA

__all__ = [
    "DEFAULT_AGGREGATES",
    "DEFAULT_INSTRUMENTS",
    "Instrument",
    "KaikoSim",
    "SentRecord",
    "StreamLog",
    "aggregate_seconds",
    "main",
]

#: ``(exchange, instrument_class, code)``, e.g. ``("cbse", "spot", "btc-usd")``.
Instrument = tuple[str, str, str]

DEFAULT_AGGREGATES: tuple[str, ...] = ("1s", "1m", "1h")
DEFAULT_INSTRUMENTS: tuple[Instrument, ...] = (
    ("cbse", "spot", "btc-usd"),
    ("binc", "spot", "btc-usdt"),
    ("binc", "spot", "eth-usdt"),
)

_AGGREGATE_RE = re.compile(r"^([1-9][0-9]*)([smhd])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_SECONDS_PER_DAY = 86400
# ts_event falls 0.05 s to 0.95 s after the end of the interval (the docs' example: 0.69 s).
_TS_EVENT_MIN_NS = 50_000_000
_TS_EVENT_SPAN_NS = 900_000_000
_Response = response_pb2.StreamAggregatesVWAPResponseV1


@functools.cache
def _day_prefix(day: int) -> str:
    return time.strftime("%Y-%m-%dT", time.gmtime(day * _SECONDS_PER_DAY))


@functools.cache
def _times_of_day() -> tuple[str, ...]:
    return tuple(
        f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(_SECONDS_PER_DAY)
    )


def _uid(start: int) -> str:
    """RFC 3339 UTC with whole seconds, e.g. ``2024-08-09T13:47:19Z`` (cached parts)."""
    day, second = divmod(start, _SECONDS_PER_DAY)
    return _day_prefix(day) + _times_of_day()[second]


def aggregate_seconds(aggregate: str) -> int:
    """Length of an aggregate such as ``1s``, ``5m``, ``1h`` or ``1d``, in seconds."""
    m = _AGGREGATE_RE.match(aggregate)
    if m is None:
        raise ValueError(f"aggregate {aggregate!r}: expected <n><s|m|h|d>, e.g. 1s or 1m")
    return int(m.group(1)) * _UNIT_SECONDS[m.group(2)]


class SentRecord(NamedTuple):
    """One message the simulator delivered (its send completed)."""

    exchange: str
    instrument_class: str
    code: str
    aggregate: str
    uid: str
    price: float


@dataclass
class StreamLog:
    """One accepted ``Subscribe`` call: what it asked for, matched and was sent."""

    id: int
    exchange: str
    instrument_class: str
    code: str
    aggregate: str
    instruments: tuple[Instrument, ...]
    sent: list[SentRecord] = field(default_factory=list)
    #: ``None`` while the stream is open; the status it ended with afterwards
    #: (``CANCELLED`` when the client went away or the connection was closed).
    status: Any = None
    details: str = ""

    @property
    def open(self) -> bool:
        return self.status is None


class _Series:
    """The simulated clock and price of one instrument at one aggregate.

    Interval ``i`` starts at ``first_start + i * step``. ``head`` is the last interval
    generated; the most recent ones are kept in ``history`` for resends and for other
    streams that are behind. Messages are built by copying a per-series template (the
    constant fields) and setting the four that change: this is the hot path at ``rate=0``.
    """

    __slots__ = (
        "aggregate",
        "first_start",
        "head",
        "history",
        "instrument",
        "price",
        "step",
        "template",
    )

    def __init__(
        self, instrument: Instrument, aggregate: str, first_start: int, price: float, depth: int
    ) -> None:
        self.instrument = instrument
        self.aggregate = aggregate
        self.step = aggregate_seconds(aggregate)
        self.first_start = first_start
        self.price = price
        self.head = -1
        self.history: deque[tuple[Any, SentRecord]] = deque(maxlen=depth)
        exchange, instrument_class, code = instrument
        self.template: Any = _Response(
            **{
                "aggregate": aggregate,
                "class": instrument_class,
                "code": code,
                "exchange": exchange,
                "sequence_id": "",  # "Not applicable" per the docs; empty on the wire
            }
        )

    def generate(self, rng: random.Random, volatility: float) -> tuple[Any, SentRecord]:
        self.head += 1
        start = self.first_start + self.head * self.step
        price = self.price = self.price * math.exp(rng.gauss(0.0, volatility))
        uid = _uid(start)
        msg = _Response()
        msg.CopyFrom(self.template)
        msg.price = price
        msg.uid = uid
        ts = msg.ts_event
        ts.seconds = start + self.step
        ts.nanos = _TS_EVENT_MIN_NS + int(rng.random() * _TS_EVENT_SPAN_NS)
        exchange, instrument_class, code = self.instrument
        item = (msg, SentRecord(exchange, instrument_class, code, self.aggregate, uid, price))
        self.history.append(item)
        return item


class _Cursor:
    """One stream's position in one series."""

    __slots__ = ("next_index", "series")

    def __init__(self, series: _Series, resend: int) -> None:
        self.series = series
        self.next_index = series.head + 1 - min(resend, len(series.history))

    def take(self, rng: random.Random, volatility: float) -> tuple[Any, SentRecord]:
        s = self.series
        idx = self.next_index
        if idx > s.head:
            item = s.generate(rng, volatility)
            self.next_index = s.head + 1
            return item
        oldest = s.head - len(s.history) + 1
        idx = max(idx, oldest)  # fell behind the kept history: skip ahead, as a live feed would
        self.next_index = idx + 1
        return s.history[idx - oldest]


@dataclass
class _Fault:
    code: Any
    details: str


class _VWAPServicer:
    """Duck-typed ``StreamAggregatesVWAPServiceV1Servicer`` delegating to the simulator."""

    def __init__(self, sim: KaikoSim) -> None:
        self._sim = sim

    async def Subscribe(self, request: Any, context: Any) -> None:  # noqa: N802 (proto name)
        await self._sim._subscribe(request, context)


class KaikoSim:
    """The simulated gateway. Use as ``async with KaikoSim(api_key=...) as sim:``.

    ``start()`` binds ``host:port`` (``port=0`` picks a free port, kept for restarts);
    ``stop()`` cancels every stream and closes every connection, keeping the simulated
    clocks and records so that ``start()`` resumes on the same port.
    """

    def __init__(
        self,
        *,
        api_key: str,
        instruments: Iterable[Instrument] = DEFAULT_INSTRUMENTS,
        aggregates: Iterable[str] = DEFAULT_AGGREGATES,
        rate: float = 0.0,
        start: datetime | None = None,
        start_price: float = 100.0,
        volatility: float = 0.001,
        resend_on_reconnect: int = 0,
        history: int = 256,
        seed: int | None = None,
        record: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
        ca: TestCA | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key: must not be empty")
        self._api_key = api_key
        self._expected_auth = f"Bearer {api_key}".encode()
        self.instruments: tuple[Instrument, ...] = tuple(
            _check_instrument(tuple(i)) for i in instruments
        )
        if len(set(self.instruments)) != len(self.instruments):
            raise ValueError("instruments: duplicates")
        self.aggregates: frozenset[str] = frozenset(aggregates)
        for agg in self.aggregates:
            aggregate_seconds(agg)
        if rate < 0:
            raise ValueError("rate: must be >= 0 (0 = as fast as possible)")
        if start is None:
            start = datetime.now(UTC)
        if start.tzinfo is None:
            raise ValueError("start: must be timezone-aware")
        if start_price <= 0:
            raise ValueError("start_price: must be > 0")
        if resend_on_reconnect < 0 or history < 1:
            raise ValueError("resend_on_reconnect must be >= 0 and history >= 1")
        #: Messages per second per stream; ``0`` = as fast as possible. Read on every send.
        self.rate = float(rate)
        self.start_time = start
        self.start_price = start_price
        self.volatility = volatility
        #: Intervals per instrument a new stream first repeats. Read at stream start.
        self.resend_on_reconnect = resend_on_reconnect
        self.history = max(history, resend_on_reconnect)
        #: Whether delivered messages are appended to ``StreamLog.sent``.
        self.record = record
        self.host = host
        self.port = port
        self.ca = ca if ca is not None else TestCA()
        self._rng = random.Random(seed)
        self._series: dict[tuple[Instrument, str], _Series] = {}
        self._server: Any = None

        #: Every accepted stream, in order of arrival (open and ended).
        self.streams: list[StreamLog] = []
        #: Every ``Subscribe`` call received, accepted or not.
        self.subscribe_calls = 0
        #: Calls refused for a missing or wrong access token.
        self.unauthenticated = 0
        #: Calls refused as ``INVALID_ARGUMENT``.
        self.invalid_requests = 0
        #: Streams currently open.
        self.active_streams = 0
        #: Streams open per subscription (exchange, class, code, aggregate), and the most
        #: ever open at once: a subscription held by two replicas at a time shows as 2.
        self.open_by_subscription: Counter[tuple[str, str, str, str]] = Counter()
        self.peak_by_subscription: Counter[tuple[str, str, str, str]] = Counter()
        #: Messages delivered, all streams together.
        self.messages_sent = 0
        #: How many times the server was (re)started.
        self.server_starts = 0

        self._stalled = False
        self._abort_after: tuple[int, _Fault] | None = None
        self._abort_next: tuple[int, _Fault] | None = None  # (messages_sent target, fault)
        self._fail_subscribe: tuple[int | None, _Fault] | None = None  # (remaining, fault)
        self._slow = False  # a stall or an abort is armed: streams check on every send
        self._injected: deque[Any] = deque()
        #: Injected messages delivered so far.
        self.injected_sent = 0
        self._wake = asyncio.Event()

    def __repr__(self) -> str:
        return (
            f"KaikoSim(target={self.target!r}, instruments={len(self.instruments)}, "
            f"rate={self.rate}, active_streams={self.active_streams})"
        )

    # ----------------------------------------------------------------- lifecycle

    @property
    def target(self) -> str:
        """``host:port`` to dial (valid once started)."""
        return f"{self.host}:{self.port}"

    @property
    def ca_pem(self) -> bytes:
        """PEM of the CA that signed the server certificate (the client's root)."""
        return self.ca.ca_pem

    def write_ca(self, path: str | os.PathLike[str]) -> None:
        """Write the CA certificate to ``path`` (for clients configured with a file)."""
        self.ca.write_ca(path)

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        """Start serving (again). After the first start the port stays the same."""
        if self._server is not None:
            return
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        sdk_pb2_grpc.add_StreamAggregatesVWAPServiceV1Servicer_to_server(
            _VWAPServicer(self), server
        )
        creds = grpc.ssl_server_credentials(
            [(self.ca.server_key_pem, self.ca.server_cert_chain_pem)]
        )
        try:
            port = server.add_secure_port(f"{self.host}:{self.port}", creds)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {self.host}:{self.port}") from exc
        if port == 0:
            raise OSError(f"cannot listen on {self.host}:{self.port}")
        self.port = port
        await server.start()
        self._server = server
        self.server_starts += 1

    async def stop(self) -> None:
        """Stop serving: every open stream is cancelled, every connection closed."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)
            self._notify()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # ------------------------------------------------------------------- faults

    def abort_after(
        self,
        n: int | None,
        code: Any = grpc.StatusCode.UNAVAILABLE,
        details: str = "simulated: stream aborted by server",
    ) -> None:
        """End every stream with ``code`` once it has delivered ``n`` messages.

        Applies to open streams too (counting from their start). ``None`` disarms.
        """
        if n is None:
            self._abort_after = None
        else:
            _check_code(code)
            if n < 0:
                raise ValueError("n: must be >= 0")
            self._abort_after = (n, _Fault(code, details))
        self._changed()

    def abort_next(
        self,
        code: Any = grpc.StatusCode.UNAVAILABLE,
        *,
        after: int = 0,
        details: str = "simulated: stream aborted by server",
    ) -> None:
        """Once: end a stream with ``code`` after ``after`` more messages are delivered.

        The counting is over all streams; the first stream to check after that takes the
        fault (with ``after=0``: any open stream, at once, even a stalled or idle one).
        """
        _check_code(code)
        if after < 0:
            raise ValueError("after: must be >= 0")
        self._abort_next = (self.messages_sent + after, _Fault(code, details))
        self._changed()

    def fail_subscribe(
        self,
        code: Any = grpc.StatusCode.UNAVAILABLE,
        *,
        times: int | None = 1,
        details: str = "simulated: subscribe refused",
    ) -> None:
        """Refuse the next ``times`` authenticated ``Subscribe`` calls (``None``: all,
        until :meth:`clear_faults`) with ``code`` before anything is sent, e.g.
        ``RESOURCE_EXHAUSTED`` (rate limit), ``PERMISSION_DENIED`` (not entitled) or
        ``INTERNAL``."""
        _check_code(code)
        if times is not None and times < 1:
            raise ValueError("times: must be >= 1 or None")
        self._fail_subscribe = (times, _Fault(code, details))

    def stall(self) -> None:
        """Keep streams (and new ones) open but send nothing until :meth:`unstall`.

        The connection still answers HTTP/2 pings: only an idle timeout detects this.
        The simulated clocks do not move while stalled."""
        self._stalled = True
        self._changed()

    def unstall(self) -> None:
        self._stalled = False
        self._changed()

    def inject(self, *messages: Any) -> None:
        """Queue ``StreamAggregatesVWAPResponseV1`` messages, with any field values, to be
        delivered as they are: each takes the send slot of the next interval of whichever
        open stream with matched instruments sends next (the interval follows in the next
        slot). Not recorded in ``StreamLog.sent``; counted in :attr:`injected_sent`."""
        self._injected.extend(messages)

    def clear_faults(self) -> None:
        """Disarm every fault and un-stall."""
        self._abort_after = None
        self._abort_next = None
        self._fail_subscribe = None
        self._stalled = False
        self._changed()

    async def close_connections(self, down_for: float = 0.0) -> None:
        """Kill every connection abruptly, then serve again on the same port.

        Implemented as ``server.stop(grace=None)``: each HTTP/2 connection gets a GOAWAY,
        every open stream is reset at once (no grace period, nothing more is sent) and
        the client sees ``UNAVAILABLE`` ("Cancelling all calls"). A new server listens on
        the same port after ``down_for`` seconds; meanwhile connection attempts are
        refused. Simulated clocks and records are kept: a re-subscribe continues the live
        series. (This is not a silent TCP drop; for a peer that goes quiet, use
        :meth:`stall`.)
        """
        await self.stop()
        if down_for > 0:
            await asyncio.sleep(down_for)
        await self.start()

    # -------------------------------------------------------------- inspection

    @property
    def sent(self) -> list[SentRecord]:
        """Everything delivered, all streams, in stream order."""
        return [rec for log in self.streams for rec in log.sent]

    async def wait_for_streams(self, n: int = 1) -> None:
        """Wait until at least ``n`` streams are open. Bound it with ``asyncio.timeout``."""
        while self.active_streams < n:
            await self._wake.wait()

    async def wait_until_idle(self) -> None:
        """Wait until no stream is open. Bound it with ``asyncio.timeout``."""
        while self.active_streams:
            await self._wake.wait()

    # ----------------------------------------------------------------- serving

    def _changed(self) -> None:
        self._slow = self._stalled or self._abort_after is not None or self._abort_next is not None
        self._notify()

    def _notify(self) -> None:
        self._wake.set()
        self._wake = asyncio.Event()

    def _authorized(self, context: Any) -> bool:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else bytes(value)
                return hmac.compare_digest(raw, self._expected_auth)
        return False

    def _take_subscribe_fault(self) -> _Fault | None:
        armed = self._fail_subscribe
        if armed is None:
            return None
        remaining, fault = armed
        if remaining is not None:
            self._fail_subscribe = None if remaining <= 1 else (remaining - 1, fault)
        return fault

    def _due_fault(self, sent: int) -> _Fault | None:
        if self._abort_after is not None and sent >= self._abort_after[0]:
            return self._abort_after[1]
        if self._abort_next is not None and self.messages_sent >= self._abort_next[0]:
            fault = self._abort_next[1]
            self._abort_next = None
            self._changed()
            return fault
        return None

    def _series_for(self, instrument: Instrument, aggregate: str) -> _Series:
        key = (instrument, aggregate)
        series = self._series.get(key)
        if series is None:
            step = aggregate_seconds(aggregate)
            first = int(self.start_time.timestamp()) // step * step
            series = _Series(instrument, aggregate, first, self.start_price, self.history)
            self._series[key] = series
        return series

    async def _subscribe(self, request: Any, context: Any) -> None:
        self.subscribe_calls += 1
        if not self._authorized(context):
            self.unauthenticated += 1
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid or missing API key")
        fault = self._take_subscribe_fault()
        if fault is not None:
            await context.abort(fault.code, fault.details)

        crit = request.instrument_criteria
        wanted = (crit.exchange, crit.instrument_class, crit.code)
        aggregate = request.aggregate
        problem = _request_problem(wanted, aggregate, self.aggregates)
        if problem is not None:
            self.invalid_requests += 1
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)

        matched = tuple(i for i in self.instruments if _matches(wanted, i))
        log = StreamLog(
            id=len(self.streams),
            exchange=wanted[0],
            instrument_class=wanted[1],
            code=wanted[2],
            aggregate=aggregate,
            instruments=matched,
        )
        self.streams.append(log)
        resend = self.resend_on_reconnect
        cursors = [_Cursor(self._series_for(i, aggregate), resend) for i in matched]
        self.active_streams += 1
        subscription = (*wanted, aggregate)
        self.open_by_subscription[subscription] += 1
        self.peak_by_subscription[subscription] = max(
            self.peak_by_subscription[subscription], self.open_by_subscription[subscription]
        )
        self._notify()
        try:
            # Response headers go out at once: the subscription is accepted even if no data
            # follows (no match, stall), and the client can tell.
            await context.send_initial_metadata(())
            await self._pump(log, cursors, context)
        except asyncio.CancelledError:
            if log.status is None:
                log.status = grpc.StatusCode.CANCELLED
            raise
        finally:
            if log.status is None:  # ended by something unexpected (a bug, a failed write)
                log.status = grpc.StatusCode.UNKNOWN
            self.active_streams -= 1
            self.open_by_subscription[subscription] -= 1
            self._notify()

    async def _gate(self, log: StreamLog, sent: int, context: Any, idle: bool) -> None:
        """Slow path: abort if a fault is due; wait while stalled (or forever if idle)."""
        while True:
            fault = self._due_fault(sent)
            if fault is not None:
                log.status, log.details = fault.code, fault.details
                await context.abort(fault.code, fault.details)
            if not (self._stalled or idle):
                return
            await self._wake.wait()

    async def _pump(self, log: StreamLog, cursors: list[_Cursor], context: Any) -> None:
        if not cursors:
            await self._gate(log, 0, context, idle=True)  # returns only by abort/cancel
            return
        loop = asyncio.get_running_loop()
        rng = self._rng
        write = context.write
        record = log.sent.append
        n = len(cursors)
        i = 0
        sent = 0
        next_due = loop.time()
        while True:
            if self._slow:
                was_stalled = self._stalled
                await self._gate(log, sent, context, idle=False)
                if was_stalled:
                    next_due = loop.time()
            rate = self.rate
            if rate > 0:
                next_due += 1.0 / rate
                delay = next_due - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                    if self._slow:  # a fault or stall may have been armed meanwhile
                        await self._gate(log, sent, context, idle=False)
                elif delay < -1.0:  # far behind (e.g. the client is slow): don't burst
                    next_due = loop.time()
            if self._injected:
                await write(self._injected.popleft())
                self.injected_sent += 1
                self.messages_sent += 1
                sent += 1
                continue
            msg, rec = cursors[i].take(rng, self.volatility)
            i = i + 1 if i + 1 < n else 0
            await write(msg)
            sent += 1
            self.messages_sent += 1
            if self.record:
                record(rec)


def _check_instrument(instrument: tuple[str, ...]) -> Instrument:
    if len(instrument) != 3 or not all(isinstance(p, str) and p for p in instrument):
        raise ValueError(f"instrument {instrument!r}: expected (exchange, class, code)")
    if "*" in instrument:
        raise ValueError(f"instrument {instrument!r}: '*' is for requests only")
    return instrument[0], instrument[1], instrument[2]


def _check_code(code: Any) -> None:
    if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
        raise ValueError(f"code {code!r}: expected a grpc.StatusCode other than OK")


def _request_problem(wanted: Instrument, aggregate: str, supported: frozenset[str]) -> str | None:
    for name, value in zip(("exchange", "instrument_class", "code"), wanted, strict=True):
        if not value:
            return f"instrument_criteria.{name} is required (use '*' for all)"
    if aggregate not in supported:
        return f"aggregate {aggregate!r} is not supported (one of {sorted(supported)})"
    return None


def _matches(wanted: Instrument, instrument: Instrument) -> bool:
    return all(w in ("*", have) for w, have in zip(wanted, instrument, strict=True))


# ---------------------------------------------------------------------- CLI


def _parse_instrument(text: str) -> Instrument:
    parts = tuple(text.split(":"))
    try:
        return _check_instrument(parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected EXCHANGE:CLASS:CODE, e.g. cbse:spot:btc-usd"
        ) from None


def _parse_aggregate(text: str) -> str:
    try:
        aggregate_seconds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _parse_start(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected ISO 8601") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bridgedev.sim.kaiko",
        description="Local TLS simulator of the Kaiko aggregates_vwap_v1 gRPC stream.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=50051, help="0 picks a free port")
    p.add_argument("--rate", type=float, default=100.0, help="msg/s per stream, 0 = max")
    p.add_argument(
        "--instrument",
        action="append",
        type=_parse_instrument,
        metavar="EXCHANGE:CLASS:CODE",
        help="repeat for each instrument (default: a small built-in universe)",
    )
    p.add_argument(
        "--aggregate",
        action="append",
        type=_parse_aggregate,
        help="repeat for each supported aggregate (default: 1s, 1m, 1h)",
    )
    p.add_argument("--start", type=_parse_start, help="simulated start time (default: now)")
    p.add_argument("--resend-on-reconnect", type=int, default=0, metavar="N")
    p.add_argument("--seed", type=int)
    p.add_argument("--ca-out", required=True, help="write the CA certificate (PEM) here")
    p.add_argument(
        "--api-key-env",
        default="KAIKO_API_KEY",
        metavar="NAME",
        help="environment variable holding the accepted API key",
    )
    return p


async def _serve(args: argparse.Namespace, api_key: str) -> None:
    sim = KaikoSim(
        api_key=api_key,
        instruments=args.instrument or DEFAULT_INSTRUMENTS,
        aggregates=args.aggregate or DEFAULT_AGGREGATES,
        rate=args.rate,
        start=args.start,
        resend_on_reconnect=args.resend_on_reconnect,
        seed=args.seed,
        record=False,  # long-running: keep counters only
        host=args.host,
        port=args.port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with sim:
        sim.write_ca(args.ca_out)
        print(f"listening on {sim.target} ca={args.ca_out}", flush=True)
        await stop.wait()
    print(
        f"stopped: subscribe_calls={sim.subscribe_calls} "
        f"unauthenticated={sim.unauthenticated} messages_sent={sim.messages_sent}",
        file=sys.stderr,
        flush=True,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    api_key = os.environ.get(args.api_key_env, "")
    if not api_key:
        print(f"error: set {args.api_key_env} to the API key to accept", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args, api_key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
