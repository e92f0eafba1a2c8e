"""Every NAV WebSocket, received in one child process shared by all of them.

Why a process: websockets parses frames in pure Python, about 8 µs of CPU per message
between the socket and `recv()`, under the GIL that normalizing and publishing need (in
one process the NAV path ran at 0.5-0.6x raw aiokafka, bench/nav.py). In a child, that work
has a core of its own; the parent gets each message over a pipe, hundreds per read, and
keeps everything else: back-fill, de-duplication, the watchdog, dead letters, Kafka.
The sockets themselves are unchanged: same handshake, keepalive, limits and close.

Each socket is opened for one symbol, and its well-formed messages (one valid record) are
normalized here, `bridge.normalize.nav.nav_tick` and the event's JSON, taken off the
parent, the process every source publishes through: in bench/nav.py's bursts the parent
went from 21-28 µs of CPU per event to 13-16, this child from 7-11 to 17-20. Anything else
(an array of records, bad JSON, a bad record) is passed on as received, and the parent
handles it as it always did, dead letters included.

Parent -> child, on stdin: JSON lines. The first is `{"log_level": N}`; then commands on a
socket id chosen by the parent: `open` (with the URL, websockets options and the symbol;
the token is in the URL, so it travels this way only), `pause`, `resume`, `close`,
`abort`. The child closes every socket and exits when stdin closes.

Child -> parent, on stdout: `childproc` frames, the socket id as their channel:

    O  the socket is open
    M  one message, as received
    T  one record, normalized: its timestamp (int64, little-endian), then the event's JSON
       (revision 1: the parent revises it if the timestamp was published before)
    E  the socket ended, or never opened: JSON `Ended` fields
    L  a log record of the child's, already redacted: JSON {"level", "name", "msg"}

Flow control: a socket's messages queue in the parent until its session reads them; past
`PAUSE_AT` messages or `max_queued_bytes` the parent pauses that socket, the child stops
reading it, websockets' own queue fills and it stops reading the TCP stream, exactly as
when the socket was read in-process.
A full pipe pauses every socket's reading in the child.

Secrets: the token is in the URL, which is never logged or reported. websockets logs the
request line at DEBUG: its logger's filter blanks `token=…` in the child, and the parent
blanks it again when it re-logs the record. Errors are built from status codes and
exception types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Final

import orjson

from bridge.errors import BadRecord
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.sources.childproc import (
    HEADER,
    Frame,
    Pipe,
    frames,
    ignore_interrupts,
    redact,
    spawn,
    stdio,
    stop,
)

__all__ = ["TICK", "TICK_TIMESTAMP", "WS_LOG", "Ended", "NavReceiver", "RemoteSocket", "redact"]

log = logging.getLogger(__name__)

#: The logger handed to websockets (in the child; the parent re-logs its records under the
#: same name). Its filter blanks the token: at DEBUG websockets logs the request line.
WS_LOG: Final = logging.getLogger(f"{__name__}.websocket")

OPENED: Final = b"O"
MESSAGE: Final = b"M"
TICK: Final = b"T"
#: The start of a `TICK` payload: the record's timestamp, Unix ms.
TICK_TIMESTAMP: Final = struct.Struct("<q")
ENDED: Final = b"E"
LOG: Final = b"L"
#: Payload bytes the child gathers before it writes them to the pipe (headers not counted).
FLUSH_AT: Final = 64 * 1024
#: Messages queued in the parent for one socket before it is paused in the child (the bytes
#: they hold are bounded too: `NavReceiver(max_queued_bytes=...)`).
PAUSE_AT: Final = 1024
#: Bytes queued in the parent for one socket before it is paused, unless told otherwise.
MAX_QUEUED_BYTES: Final = 8 << 20


@dataclass(eq=False)
class Ended(Exception):  # noqa: N818 - not an error: a clean close ends a socket too
    """A socket ended (or never opened). `ok`: a clean close by the server. `status` and
    `retry_after`: the HTTP refusal of the handshake. `reason`: what else happened, in words
    that never quote the URL."""

    ok: bool = False
    status: int | None = None
    retry_after: str | None = None
    reason: str = ""
    too_large: int | None = None  # the size of a message over `max_size` (closed with 1009)

    def __str__(self) -> str:
        if self.status is not None:
            return f"handshake refused with HTTP {self.status}"
        return "closed" if self.ok else self.reason


# -- the parent's end --------------------------------------------------------------------


class RemoteSocket:
    """One socket held by the child: `read()` its messages, then `close()` it."""

    def __init__(self, child: _Child, sid: int) -> None:
        self._child = child
        self.id = sid
        self._items: list[Frame] = []
        self._bytes = 0
        self._ready = asyncio.Event()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._paused = False
        self.ended: Ended | None = None

    def __repr__(self) -> str:
        return f"RemoteSocket({self.id})"

    @property
    def paused(self) -> bool:
        """Whether the child was told to stop reading this socket (too much queued here)."""
        return self._paused

    @property
    def queued(self) -> tuple[int, int]:
        """Messages queued here for the session to read, and the bytes they hold."""
        return len(self._items), self._bytes

    async def read(self) -> list[Frame]:
        """Every message frame queued now (kind, id, message, received-at), at least one;
        raises `Ended` when the socket has ended and all its messages were read."""
        while not self._items:
            if self.ended is not None:
                raise self.ended
            self._ready.clear()
            await self._ready.wait()
        items, self._items = self._items, []
        self._bytes = 0
        if self._paused:
            self._paused = False
            self._child.command("resume", self.id)
        return items

    def close(self) -> None:
        """Close the socket (the child does the close handshake); idempotent."""
        if self._child.forget(self):
            self._child.command("close", self.id)

    def abort(self) -> None:
        """Drop the connection without a close handshake (a silent peer would not answer)."""
        if self._child.forget(self):
            self._child.command("abort", self.id)

    # -- fed by the child's reader

    def _put(self, frame: Frame) -> None:
        items = self._items
        items.append(frame)
        self._bytes += len(frame[2])
        if len(items) == 1:
            self._ready.set()
        if (
            len(items) > PAUSE_AT or self._bytes > self._child.max_queued_bytes
        ) and not self._paused:
            self._paused = True
            self._child.command("pause", self.id)

    def _open(self) -> None:
        if not self._opened.done():
            self._opened.set_result(None)

    def _end(self, ended: Ended) -> None:
        self.ended = ended
        if not self._opened.done():
            self._opened.set_exception(ended)
        self._ready.set()


class _Child:
    """One child process, its sockets, and the task that reads its frames."""

    def __init__(self, proc: asyncio.subprocess.Process, max_queued_bytes: int) -> None:
        self.proc = proc
        self.max_queued_bytes = max_queued_bytes
        self.sockets: dict[int, RemoteSocket] = {}
        self.stopping = False
        self.reader = asyncio.create_task(self._read(), name="nav-receiver")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.reader.done()

    def write(self, doc: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))

    def command(self, op: str, sid: int) -> None:
        self.write({"op": op, "id": sid})

    def forget(self, sock: RemoteSocket) -> bool:
        """Drop `sock` from the table; whether the child may still hold it."""
        return self.sockets.pop(sock.id, None) is not None and sock.ended is None

    async def _read(self) -> None:
        """Dispatch the child's frames until it exits; then end every socket it held."""
        problem = ""
        try:
            await self._dispatch()
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            problem = f" after a frame that cannot be read ({type(exc).__name__})"
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()  # this child is done for; the next open starts another
        code = await self.proc.wait()
        sockets = self.sockets
        if sockets and not self.stopping:
            log.warning("the NAV WebSocket receiver exited with code %s%s", code, problem)
        for sock in list(sockets.values()):
            sock._end(Ended(reason=f"the WebSocket receiver exited with code {code}{problem}"))
        sockets.clear()

    async def _dispatch(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            raise TypeError("the receiver process needs a stdout pipe")
        sockets = self.sockets
        async for batch in frames(stdout):
            for frame in batch:
                kind, sid, payload, _ = frame
                sock = sockets.get(sid)
                if kind in (TICK, MESSAGE):
                    if sock is not None:
                        sock._put(frame)
                elif kind == LOG:
                    _relog(orjson.loads(payload))
                elif sock is None:
                    continue
                elif kind == OPENED:
                    sock._open()
                else:
                    del sockets[sid]
                    sock._end(Ended(**orjson.loads(payload)))


class NavReceiver:
    """The child process holding the NAV sockets, started on the first `open()` and again
    after it dies (its sockets then end with an error; their sessions reconnect)."""

    def __init__(self, *, max_queued_bytes: int = MAX_QUEUED_BYTES) -> None:
        self._max_queued_bytes = max_queued_bytes
        self._child: _Child | None = None
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()  # many sessions open at once: one child for all

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child is not None else None

    async def __aenter__(self) -> NavReceiver:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def open(self, url: str, options: dict[str, Any], symbol: str) -> RemoteSocket:
        """Open a socket to `url` (websockets `connect` options); raises `Ended` if the
        handshake fails. Messages that are one valid record of `symbol` come as `TICK`
        frames, the others as `MESSAGE`."""
        child = await self._running()
        sock = RemoteSocket(child, next(self._ids))
        child.sockets[sock.id] = sock
        child.write({"op": "open", "id": sock.id, "url": url, "options": options, "symbol": symbol})
        try:
            await sock._opened
        except BaseException:
            sock.close()
            raise
        return sock

    async def _running(self) -> _Child:
        async with self._starting:
            child = self._child
            if child is None or not child.alive:
                child = self._child = _Child(await spawn(__name__), self._max_queued_bytes)
                child.write({"log_level": WS_LOG.getEffectiveLevel()})
            return child

    async def close(self) -> None:
        """Stop the child (it closes every socket first). The receiver can be used again."""
        child, self._child = self._child, None
        if child is not None:
            child.stopping = True
            await stop(child.proc, grace_s=5.0)
            await child.reader  # it ends every socket still open


def _relog(doc: dict[str, Any]) -> None:
    logger = logging.getLogger(doc["name"])
    level = int(doc["level"])
    if logger.isEnabledFor(level):
        logger.log(level, "%s", redact(str(doc["msg"])))


# -- the child's end ---------------------------------------------------------------------


class _RedactToken(logging.Filter):
    """Blanks `token=…` in records websockets logs: message, arguments and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a bad format string: keep the text, drop the args
            message = f"{record.msg} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact(text), None
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


WS_LOG.addFilter(_RedactToken())


class _Frames:
    """Frames to stdout, gathered into one write per event-loop turn or per `FLUSH_AT`
    bytes, whichever comes first.

    The byte bound matters in a burst: websockets parses a whole TCP read at once, so every
    socket's `recv()` may return thousands of messages without yielding. Written only at
    the end of the turn, they would reach the bridge in one lump, the bridge idle until
    then and the child idle after; written as they come, both work at once.
    """

    def __init__(self, out: asyncio.WriteTransport, pipe: Pipe) -> None:
        self._out = out
        self.pipe = pipe
        self._parts: list[bytes] = []
        self._size = 0
        self._loop = asyncio.get_running_loop()

    def put(self, kind: bytes, sid: int, payload: bytes, received_at: float = 0.0) -> None:
        parts = self._parts
        if not parts:
            self._loop.call_soon(self.flush)
        parts.append(HEADER.pack(kind, sid, len(payload), received_at))
        parts.append(payload)
        self._size += len(payload)
        if self._size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._out.write(b"".join(self._parts))
            self._parts.clear()
            self._size = 0


class _Forward(logging.Handler):
    """The child's log records, sent to the parent to be logged there."""

    def __init__(self, frames: _Frames) -> None:
        super().__init__()
        self._frames = frames

    def emit(self, record: logging.LogRecord) -> None:
        try:
            doc = {"level": record.levelno, "name": record.name, "msg": self.format(record)}
            self._frames.put(LOG, 0, orjson.dumps(doc))
        except Exception:  # logging must never break the receive
            self.handleError(record)


async def _connect(url: str, options: dict[str, Any]) -> Any:
    """The open connection, or the `Ended` that says why there is none (built from status
    codes and exception types: websockets' own messages may quote the URL)."""
    # websockets is imported in the child only: the bridge's process has no use for it.
    from websockets.asyncio.client import connect
    from websockets.exceptions import (
        ConnectionClosed,
        InvalidHandshake,
        InvalidStatus,
        InvalidURI,
        WebSocketException,
    )

    try:
        return await connect(url, compression=None, logger=WS_LOG, **options)
    except InvalidStatus as exc:
        response = exc.response
        return Ended(status=response.status_code, retry_after=response.headers.get("Retry-After"))
    except (WebSocketException, OSError, TimeoutError, ValueError) as exc:
        error = exc
    if isinstance(error, InvalidURI):
        reason = "the socket URL is invalid; check vinter.ws_url"
    elif isinstance(error, InvalidHandshake):
        reason = f"handshake failed ({type(error).__name__})"
    elif isinstance(error, ConnectionClosed):
        reason = f"closed during the handshake ({close_code(error)})"
    elif isinstance(error, TimeoutError):
        reason = f"no handshake within {options.get('open_timeout'):g}s"
    elif isinstance(error, OSError):
        reason = f"cannot connect: {error.strerror or type(error).__name__}"
    else:
        reason = f"cannot open the socket ({type(error).__name__})"
    return Ended(reason=reason)


def _lost(exc: Any) -> Ended:
    """How a lost connection ended; a message over `max_size` is told apart (its size)."""
    from websockets.exceptions import PayloadTooBig

    cause = exc.__cause__
    if isinstance(cause, PayloadTooBig):
        size = (cause.size or 0) + (cause.current_size or 0)
        return Ended(reason=f"a message over the size limit ({size} bytes)", too_large=size)
    return Ended(reason=f"connection lost ({close_code(exc)})")


def close_code(exc: Any) -> str:
    """How a websockets `ConnectionClosed` ended, in words."""
    frame = exc.rcvd or exc.sent
    return f"code {frame.code}" if frame is not None else "no close frame"


class _Sockets:
    """The child's sockets: one task each, relaying messages to the parent."""

    def __init__(self, frames: _Frames) -> None:
        self._frames = frames
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._gates: dict[int, asyncio.Event] = {}
        self._connections: dict[int, Any] = {}

    def command(self, doc: dict[str, Any]) -> None:
        op, sid = doc.pop("op"), doc.pop("id")
        if op == "open":
            gate = self._gates[sid] = asyncio.Event()
            gate.set()
            self._tasks[sid] = asyncio.create_task(self._relay(sid, doc, gate))
        elif op == "pause":
            if paused := self._gates.get(sid):
                paused.clear()
        elif op == "resume":
            if resumed := self._gates.get(sid):
                resumed.set()
        elif (task := self._tasks.get(sid)) is not None:  # close, abort
            connection = self._connections.get(sid)
            if op == "abort" and connection is not None:
                connection.transport.abort()
            task.cancel()

    async def close_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _relay(self, sid: int, spec: dict[str, Any], gate: asyncio.Event) -> None:
        from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

        frames = self._frames
        try:
            connection = await _connect(spec["url"], spec["options"])
            if isinstance(connection, Ended):
                frames.put(ENDED, sid, orjson.dumps(asdict(connection)))
                return
            self._connections[sid] = connection
            frames.put(OPENED, sid, b"")
            try:
                ended = await self._receive(sid, connection, gate, spec["symbol"])
            except ConnectionClosedOK:
                ended = Ended(ok=True)
            except ConnectionClosed as exc:
                ended = _lost(exc)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await connection.close()
                raise
            except Exception as exc:  # reported, not raised
                ended = Ended(reason=f"receive failed ({type(exc).__name__})")
                connection.transport.abort()
            frames.put(ENDED, sid, orjson.dumps(asdict(ended)))
        finally:
            self._tasks.pop(sid, None)
            self._gates.pop(sid, None)
            self._connections.pop(sid, None)

    async def _receive(self, sid: int, connection: Any, gate: asyncio.Event, symbol: str) -> Ended:
        # The hot loop: one recv, one frame (a TICK when it is one valid record), nothing else.
        recv = connection.recv
        put = self._frames.put
        pipe = self._frames.pipe
        monotonic = time.monotonic
        while True:
            if not gate.is_set():
                await gate.wait()
            message = await recv(decode=False)
            received_at = monotonic()
            if (tick := _tick(message, symbol)) is not None:
                put(TICK, sid, tick, received_at)
            else:
                put(MESSAGE, sid, message, received_at)
            if pipe.full:
                await pipe.drain()


def _tick(message: bytes, symbol: str) -> bytes | None:
    """A `TICK` payload if `message` is one valid record of `symbol`; else None."""
    try:
        doc = orjson.loads(message)
        if type(doc) is not dict:
            return None
        event = nav_tick(doc, source=SOURCE_WS, expected_symbol=symbol)
        # not `event.to_json()`: the concatenation already copies the JSON out of orjson's
        # oversized buffer, which is all `to_json` adds
        return TICK_TIMESTAMP.pack(event.data["timestamp"]) + orjson.dumps(event.envelope())
    except (ValueError, TypeError, BadRecord):  # orjson's errors are Value- and TypeErrors
        return None


async def _child() -> None:
    ignore_interrupts()
    stdin, out, pipe = await stdio()
    frames = _Frames(out, pipe)
    config = orjson.loads(await stdin.readline() or b"{}")
    root = logging.getLogger()
    root.handlers[:] = [_Forward(frames)]
    root.setLevel(int(config.get("log_level", logging.WARNING)))
    sockets = _Sockets(frames)
    try:
        while line := await stdin.readline():
            sockets.command(orjson.loads(line))
    finally:
        await sockets.close_all()
        frames.flush()
        out.close()  # flushes what is buffered first
        await pipe.closed


def main() -> None:
    """`python -m bridge.sources.nav_receiver`: started by `NavReceiver`, not by hand."""
    from bridge.loop import run_loop

    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        run_loop(_child())


if __name__ == "__main__":
    if sys.stdin.isatty():
        sys.exit("started by the bridge (bridge.sources.nav_receiver.NavReceiver), not by hand")
    main()
