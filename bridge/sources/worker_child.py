"""The child's end of the receiver worker: it reads commands on stdin, runs a transport per
channel, and writes frames on stdout, its log records among them.

Two ways to run a transport: `serve()` for asyncio ones, many channels in one process (NAV
sockets); `serve_blocking()` for one blocking channel with no event loop at all (a VWAP
stream, read on the calling thread). Either exits when stdin closes: it never outlives the
bridge.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import orjson

from bridge.errors import BadRecord
from bridge.sources.worker import DATA, ENDED, HEADER, LOG, OPENED, REFUSED, pack_refused

log = logging.getLogger(__name__)

#: Payload bytes gathered before they are written to the pipe (headers not counted).
FLUSH_AT = 64 * 1024
Put = Callable[[bytes, int, bytes, float], None]


def ignore_interrupts() -> None:
    """Ctrl-C is for the parent, which hangs up when it wants the child gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _Forward(logging.Handler):
    """The child's log records, sent to the parent to be logged there."""

    def __init__(self, put: Put) -> None:
        super().__init__()
        self._put = put

    def emit(self, record: logging.LogRecord) -> None:
        try:
            doc = {"level": record.levelno, "name": record.name, "msg": self.format(record)}
            self._put(LOG, 0, orjson.dumps(doc), 0.0)
        except Exception:  # logging must never break the receive
            self.handleError(record)


def _forward_logs(put: Put, config: dict[str, Any]) -> None:
    root = logging.getLogger()
    root.handlers[:] = [_Forward(put)]
    root.setLevel(int(config.get("log_level", logging.WARNING)))


# -- asyncio transports ------------------------------------------------------------------


class Pipe(asyncio.Protocol):
    """Stdout's write side with flow control: `drain()` waits while the pipe is full."""

    def __init__(self) -> None:
        self._writable = asyncio.Event()
        self._writable.set()
        self.closed = asyncio.get_running_loop().create_future()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._writable.set()  # a later write raises; never wait forever
        if not self.closed.done():
            self.closed.set_result(None)

    @property
    def full(self) -> bool:
        return not self._writable.is_set()

    async def drain(self) -> None:
        await self._writable.wait()


class FrameWriter:
    """Frames to stdout, gathered into one write per event-loop turn or per `FLUSH_AT`
    bytes, whichever comes first (why the byte bound: docs/design.md, "Receiver worker")."""

    def __init__(self, out: asyncio.WriteTransport, pipe: Pipe) -> None:
        self._out = out
        self._pipe = pipe
        self._parts: list[bytes] = []
        self._size = 0
        self._loop = asyncio.get_running_loop()

    def put(self, kind: bytes, cid: int, payload: bytes, received_at: float = 0.0) -> None:
        parts = self._parts
        if not parts:
            self._loop.call_soon(self.flush)
        parts.append(HEADER.pack(kind, cid, len(payload), received_at))
        parts.append(payload)
        self._size += len(payload)
        if self._size >= FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._out.write(b"".join(self._parts))
            self._parts.clear()
            self._size = 0

    @property
    def full(self) -> bool:
        """Whether the pipe to the parent is full: the transport should `drain()`."""
        return self._pipe.full

    async def drain(self) -> None:
        """Wait while the pipe to the parent is full."""
        await self._pipe.drain()


class Link:
    """A transport's handle on its channel: say it opened, hand on what it received, honour
    pause (`gate`), and say how to drop the connection at once (`on_abort`)."""

    def __init__(self, cid: int, frames: FrameWriter) -> None:
        self.id = cid
        self.frames = frames
        self.gate = asyncio.Event()
        self.gate.set()
        self.on_abort: Callable[[], None] | None = None

    def opened(self) -> None:
        self.frames.put(OPENED, self.id, b"")

    def data(self, payload: bytes, received_at: float) -> None:
        self.frames.put(DATA, self.id, payload, received_at)

    def refused(self, refused: BadRecord, received_at: float) -> None:
        self.frames.put(REFUSED, self.id, pack_refused(refused), received_at)


#: An asyncio transport: runs one channel until it ends; returns its end report.
Relay = Callable[[Link, dict[str, Any]], Awaitable[dict[str, Any]]]


class _Links:
    """The child's channels: one task each."""

    def __init__(self, relay: Relay, frames: FrameWriter) -> None:
        self._relay = relay
        self._frames = frames
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._links: dict[int, Link] = {}

    def command(self, doc: dict[str, Any]) -> None:
        op, cid = doc["op"], doc["id"]
        link = self._links.get(cid)
        if op == "open":
            link = self._links[cid] = Link(cid, self._frames)
            self._tasks[cid] = asyncio.create_task(self._run(link, doc["spec"]))
        elif link is None:
            return
        elif op == "pause":
            link.gate.clear()
        elif op == "resume":
            link.gate.set()
        else:  # close, abort
            if op == "abort" and link.on_abort is not None:
                link.on_abort()
            self._tasks[cid].cancel()

    async def _run(self, link: Link, spec: dict[str, Any]) -> None:
        try:
            try:
                report: dict[str, Any] | None = await self._relay(link, spec)
            except Exception:  # a transport's bug ends its channel, not the child
                log.exception("the receiver's transport failed")
                report = None
            self._frames.put(ENDED, link.id, orjson.dumps(report))
        finally:
            self._tasks.pop(link.id, None)
            self._links.pop(link.id, None)

    async def close_all(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _serve(relay: Relay) -> None:
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    out, pipe = await loop.connect_write_pipe(Pipe, sys.stdout)
    frames = FrameWriter(out, pipe)
    _forward_logs(frames.put, orjson.loads(await stdin.readline() or b"{}"))
    links = _Links(relay, frames)
    try:
        while line := await stdin.readline():
            links.command(orjson.loads(line))
    finally:
        await links.close_all()
        frames.flush()
        out.close()  # flushes what is buffered first
        await pipe.closed


def serve(relay: Relay) -> None:
    """Run an asyncio transport's channels until stdin closes (the child's `main`)."""
    from bridge.loop import run_loop

    ignore_interrupts()
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        run_loop(_serve(relay))


# -- one blocking transport --------------------------------------------------------------


class BlockingLink:
    """A blocking transport's handle on its one channel. `gate` is clear while paused;
    `hung_up` is set once the parent closed the channel or stdin, and `on_hangup` runs."""

    def __init__(self, cid: int) -> None:
        self.id = cid
        self.gate = threading.Event()
        self.gate.set()
        self.hung_up = threading.Event()
        self.on_hangup: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._out = sys.stdout.buffer

    def data(self, payload: bytes, received_at: float) -> None:
        """Hand on what the channel received (blocks while the pipe is full)."""
        frame = HEADER.pack(DATA, self.id, len(payload), received_at) + payload
        with self._lock:
            self._out.write(frame)
            self._out.flush()

    def refused(self, refused: BadRecord, received_at: float) -> None:
        self._write(REFUSED, pack_refused(refused), received_at)

    def _write(self, kind: bytes, payload: bytes, received_at: float = 0.0) -> None:
        frame = HEADER.pack(kind, self.id, len(payload), received_at) + payload
        with self._lock:  # log records come from any thread
            self._out.write(frame)
            self._out.flush()

    def hang_up(self) -> None:
        self.hung_up.set()
        self.gate.set()
        if self.on_hangup is not None:
            self.on_hangup()


def _lines(fd: int) -> Iterator[bytes]:
    """Lines read from a file descriptor: not `sys.stdin`, whose buffered reader holds a lock
    the interpreter's exit would wait for while a thread is blocked in it."""
    pending = b""
    with contextlib.suppress(OSError):
        while chunk := os.read(fd, 1 << 16):
            *lines, pending = (pending + chunk).split(b"\n")
            yield from lines


def _commands(lines: Iterator[bytes], link: BlockingLink) -> None:
    for line in lines:
        op = orjson.loads(line)["op"]
        if op == "pause":
            link.gate.clear()
        elif op == "resume":
            link.gate.set()
        elif op in ("close", "abort"):
            break
    link.hang_up()


def serve_blocking(relay: Callable[[BlockingLink, dict[str, Any]], dict[str, Any] | None]) -> None:
    """Run one blocking channel on this thread (the child's `main`); a thread reads the
    commands. `relay` returns its end report, or None once hung up."""
    ignore_interrupts()
    lines = _lines(sys.stdin.fileno())
    config = orjson.loads(next(lines, b"{}"))
    first = next(lines, None)
    if first is None:
        return
    doc = orjson.loads(first)
    link = BlockingLink(doc["id"])
    _forward_logs(lambda kind, _cid, payload, at: link._write(kind, payload, at), config)
    threading.Thread(target=_commands, args=(lines, link), name="commands", daemon=True).start()
    try:
        link._write(OPENED, b"")
        try:
            report = relay(link, doc["spec"])
        except (BrokenPipeError, ConnectionResetError):
            raise
        except Exception:  # a transport's bug ends its channel, reported
            log.exception("the receiver's transport failed")
            link._write(ENDED, b"null")
            return
        if report is not None:
            link._write(ENDED, orjson.dumps(report))
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent is gone
