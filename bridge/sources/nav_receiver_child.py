"""The child's end of `nav_receiver`: it holds every NAV WebSocket and writes what each
received to its stdout, decoded: ticks ready to publish, refusals ready to dead-letter.

Started by `NavReceiver` as `python -m bridge.sources.nav_receiver_child`, never by hand.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import asdict
from typing import Any

import orjson

from bridge.normalize.nav import decode_message
from bridge.sources.childproc import HEADER, Pipe, ignore_interrupts, redact, stdio
from bridge.sources.nav_receiver import (
    ENDED,
    FLUSH_AT,
    LOG,
    OPENED,
    REFUSED,
    TICK,
    TICK_TIMESTAMP,
    WS_LOG,
    Ended,
    pack_refused,
)


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


class FrameWriter:
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

    def __init__(self, frames: FrameWriter) -> None:
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

    def __init__(self, frames: FrameWriter) -> None:
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
        # The hot loop: one recv, decoded, one frame per tick or refusal, nothing else.
        recv = connection.recv
        put = self._frames.put
        pipe = self._frames.pipe
        monotonic = time.monotonic
        tick_head = TICK_TIMESTAMP.pack
        dumps = orjson.dumps
        while True:
            if not gate.is_set():
                await gate.wait()
            message = await recv(decode=False)
            received_at = monotonic()
            ticks, refused = decode_message(message, symbol)
            for event in ticks:
                # not `event.to_json()`: the concatenation already copies the JSON out of
                # orjson's oversized buffer, which is all `to_json` adds
                put(
                    TICK,
                    sid,
                    tick_head(event.data["timestamp"]) + dumps(event.envelope()),
                    received_at,
                )
            for bad in refused:
                put(REFUSED, sid, pack_refused(bad), received_at)
            if pipe.full:
                await pipe.drain()


async def _child() -> None:
    ignore_interrupts()
    stdin, out, pipe = await stdio()
    frames = FrameWriter(out, pipe)
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
    """`python -m bridge.sources.nav_receiver_child`: started by `NavReceiver`, not by hand."""
    from bridge.loop import run_loop

    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        run_loop(_child())


if __name__ == "__main__":
    if sys.stdin.isatty():
        sys.exit("started by the bridge (bridge.sources.nav_receiver.NavReceiver), not by hand")
    main()
