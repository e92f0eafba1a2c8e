"""Every NAV WebSocket, received in one child process shared by all of them.

The parent's end: `NavReceiver` opens sockets in the child and reads what each received
(frame kinds below); the child's end is `nav_receiver_child`. Why a child, the protocol and
its flow control: docs/design.md, "NAV over WebSocket".
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from dataclasses import dataclass
from typing import Any, Final

import orjson

from bridge.errors import AuthError, BadRecord, UpstreamError
from bridge.sources.childproc import (
    Frame,
    frames,
    redact,
    spawn,
    stop,
)

__all__ = [
    "REFUSED",
    "TICK",
    "TICK_TIMESTAMP",
    "WS_LOG",
    "Ended",
    "NavReceiver",
    "RemoteSocket",
    "pack_refused",
    "redact",
    "unpack_refused",
]

log = logging.getLogger(__name__)

CHILD_MODULE: Final = "bridge.sources.nav_receiver_child"

#: The logger handed to websockets (in the child; the parent re-logs its records under the
#: same name). Its filter blanks the token: at DEBUG websockets logs the request line.
WS_LOG: Final = logging.getLogger(f"{__name__}.websocket")

OPENED: Final = b"O"
TICK: Final = b"T"
#: The start of a `TICK` payload: the record's timestamp, Unix ms.
TICK_TIMESTAMP: Final = struct.Struct("<q")
REFUSED: Final = b"R"
#: The start of a `REFUSED` payload: the lengths of its reason and detail (then the input).
REFUSED_HEAD: Final = struct.Struct("<HI")
ENDED: Final = b"E"
LOG: Final = b"L"
#: Payload bytes the child gathers before it writes them to the pipe (headers not counted).
FLUSH_AT: Final = 64 * 1024
#: Messages queued in the parent for one socket before it is paused in the child (the bytes
#: they hold are bounded too: `NavReceiver(max_queued_bytes=...)`).
PAUSE_AT: Final = 1024
#: Bytes queued in the parent for one socket before it is paused, unless told otherwise.
MAX_QUEUED_BYTES: Final = 8 << 20
#: The longest Retry-After of a refused handshake the source honours.
MAX_RETRY_AFTER_S: Final = 300.0


def pack_refused(refused: BadRecord) -> bytes:
    """A `REFUSED` payload: the decoder's refusal with the input it refused."""
    reason, detail = refused.reason.encode(), refused.detail.encode()
    raw = refused.raw or b""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    return REFUSED_HEAD.pack(len(reason), len(detail)) + reason + detail + data


def unpack_refused(payload: bytes) -> BadRecord:
    """The refusal a `REFUSED` payload carries."""
    reason_len, detail_len = REFUSED_HEAD.unpack_from(payload)
    start = REFUSED_HEAD.size
    reason = payload[start : start + reason_len].decode()
    start += reason_len
    detail = payload[start : start + detail_len].decode()
    return BadRecord(reason, detail, raw=payload[start + detail_len :])


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP-date: our own backoff will do


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

    def as_error(self, name: str, symbol: str, shown_url: str) -> UpstreamError:
        """The error the source `name` raises for it (`shown_url`: the URL without token)."""
        if self.status is None:
            return UpstreamError(name, self.reason)
        if self.status in (401, 403):
            return AuthError(
                name,
                f"the NAV WebSocket of {symbol} refused the token (HTTP {self.status})",
                setting="vinter.token",
            )
        where = f" at {shown_url} (check vinter.ws_url)" if self.status == 404 else ""
        return UpstreamError(
            name,
            f"handshake refused with HTTP {self.status}{where}",
            retry_after=_retry_after(self.retry_after),
        )

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
                if kind in (TICK, REFUSED):
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
        handshake fails. Each message comes decoded (`normalize.nav.decode_message`): its
        ticks as `TICK` frames, its refusals as `REFUSED` frames."""
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
                child = self._child = _Child(await spawn(CHILD_MODULE), self._max_queued_bytes)
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
