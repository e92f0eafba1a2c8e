"""The receiver worker: child processes that hold upstream connections and relay what each
received, so that a transport's own parsing runs on a core and a GIL of its own.

NAV sockets and VWAP streams use it the same way: `open(spec)` a channel, `read()` what
it received, `close()` it. Frames, pause/resume and log forwarding stay in this module and
its child end, `worker_child`; the wire protocol is in docs/design.md ("Receiver worker").
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections import deque
from typing import Any, Final

import orjson

from bridge.errors import BadRecord
from bridge.sources.childproc import redact, spawn, stop

__all__ = ["MAX_QUEUED_BYTES", "PAUSE_AT", "Channel", "Ended", "Received", "Worker"]

log = logging.getLogger(__name__)

#: A frame's header: kind, channel, payload length, the CLOCK_MONOTONIC time it was received.
HEADER: Final = struct.Struct("<cIId")
OPENED: Final = b"O"
DATA: Final = b"D"
REFUSED: Final = b"R"
ENDED: Final = b"E"
LOG: Final = b"L"
#: The start of a `REFUSED` payload: the lengths of its reason and detail (then the input).
REFUSED_HEAD: Final = struct.Struct("<HI")
#: Items queued in the parent for one channel before the child stops reading it.
PAUSE_AT: Final = 1024
#: Bytes queued in the parent for one channel before the child stops reading it.
MAX_QUEUED_BYTES: Final = 8 << 20
#: How long a child whose last channel ended may take to exit on its own.
EXIT_GRACE_S: Final = 2.0
#: How many children's exit codes a worker remembers.
EXIT_CODES_KEPT: Final = 64
_READ_SIZE = 1 << 18

#: What a channel received: its payload (or the decoder's refusal) and when (monotonic).
Received = tuple[bytes | BadRecord, float]


def pack_refused(refused: BadRecord) -> bytes:
    """A `REFUSED` payload: a decoder's refusal with the input it refused."""
    reason, detail = refused.reason.encode(), refused.detail.encode()
    raw = refused.raw or b""
    data = raw if isinstance(raw, bytes) else raw.encode("utf-8", "surrogatepass")
    return REFUSED_HEAD.pack(len(reason), len(detail)) + reason + detail + data


def unpack_refused(payload: bytes) -> BadRecord:
    reason_len, detail_len = REFUSED_HEAD.unpack_from(payload)
    start = REFUSED_HEAD.size
    reason = payload[start : start + reason_len].decode()
    start += reason_len
    detail = payload[start : start + detail_len].decode()
    return BadRecord(reason, detail, raw=payload[start + detail_len :])


class Ended(Exception):  # noqa: N818 - not an error: a clean close ends a channel too
    """A channel ended (or never opened). `report`: what its transport said, None if the
    child process died; `reason`: in words, never quoting a secret."""

    def __init__(self, report: dict[str, Any] | None, reason: str = "") -> None:
        super().__init__(reason or "ended")
        self.report = report
        self.reason = reason


class Channel:
    """One upstream connection held by a child: `read()` what it received, then `close()`."""

    def __init__(self, child: _Child, cid: int) -> None:
        self._child = child
        self.id = cid
        self._items: list[Received] = []
        self._bytes = 0
        self._ready = asyncio.Event()
        self._opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._paused = False
        self.ended: Ended | None = None

    def __repr__(self) -> str:
        return f"Channel({self.id})"

    @property
    def paused(self) -> bool:
        """Whether the child was told to stop reading this channel (too much queued here)."""
        return self._paused

    @property
    def queued(self) -> tuple[int, int]:
        """Items queued here to be read, and the bytes they hold."""
        return len(self._items), self._bytes

    async def read(self) -> list[Received]:
        """Everything received and not yet read, at least one item; raises `Ended` once the
        channel has ended and all it received was read."""
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
        """Close the connection (gracefully, as its transport does); idempotent."""
        if self._child.forget(self):
            self._child.command("close", self.id)

    def abort(self) -> None:
        """Drop the connection at once (a silent peer would not answer a close)."""
        if self._child.forget(self):
            self._child.command("abort", self.id)

    def _put(self, item: Received, size: int) -> None:
        items = self._items
        items.append(item)
        self._bytes += size
        if len(items) == 1:
            self._ready.set()
        if not self._paused and (
            len(items) > self._child.pause_at or self._bytes > self._child.max_queued_bytes
        ):
            self._paused = True
            self._child.command("pause", self.id)

    def _end(self, ended: Ended) -> None:
        self.ended = ended
        if not self._opened.done():
            self._opened.set_exception(ended)
        self._ready.set()


class _Child:
    """One child process, its channels, and the task that reads its frames."""

    def __init__(self, worker: Worker, proc: asyncio.subprocess.Process) -> None:
        self.worker = worker
        self.proc = proc
        self.pause_at = worker.pause_at
        self.max_queued_bytes = worker.max_queued_bytes
        self.channels: dict[int, Channel] = {}
        self.opened = 0
        self.stopping = False
        self.reader = asyncio.create_task(self._read(), name=f"{worker.name}-receiver")

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and not self.reader.done()

    def write(self, doc: dict[str, Any]) -> None:
        stdin = self.proc.stdin
        if stdin is not None and not stdin.is_closing():
            stdin.write(orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE))

    def command(self, op: str, cid: int) -> None:
        self.write({"op": op, "id": cid})

    def forget(self, channel: Channel) -> bool:
        """Drop `channel`; whether the child may still hold it."""
        held = self.channels.pop(channel.id, None) is not None and channel.ended is None
        self.worker.release(self)
        return held

    async def _read(self) -> None:
        """Dispatch the child's frames until it exits; then end every channel it held."""
        problem = ""
        try:
            await self._dispatch()
        except (ValueError, TypeError, KeyError, struct.error) as exc:
            problem = f" after a frame that cannot be read ({type(exc).__name__})"
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        code = await self.proc.wait()
        self.worker.exit_codes.append(code)
        channels = self.channels
        if channels and not self.stopping:
            log.warning("the %s receiver exited with code %s%s", self.worker.name, code, problem)
        for channel in list(channels.values()):
            channel._end(Ended(None, f"the {self.worker.name} receiver exited with code {code}"))
        channels.clear()

    async def _dispatch(self) -> None:
        stdout = self.proc.stdout
        if stdout is None:
            raise TypeError("the receiver process needs a stdout pipe")
        channels = self.channels
        unpack, size = HEADER.unpack_from, HEADER.size
        pending = b""
        while chunk := await stdout.read(_READ_SIZE):
            data = pending + chunk if pending else chunk
            end, pos = len(data), 0
            while end - pos >= size:
                kind, cid, length, received_at = unpack(data, pos)
                start = pos + size
                if end - start < length:
                    break
                pos = start + length
                channel = channels.get(cid)
                if kind == DATA:
                    if channel is not None:
                        channel._put((data[start:pos], received_at), length)
                else:
                    self._control(kind, cid, channel, data[start:pos], received_at)
            pending = data[pos:]

    def _control(
        self, kind: bytes, cid: int, channel: Channel | None, payload: bytes, received_at: float
    ) -> None:
        """Every frame but data: a refusal, a log record, a channel opened or ended."""
        if kind == LOG:
            _relog(orjson.loads(payload))
        elif channel is None:
            return
        elif kind == REFUSED:
            channel._put((unpack_refused(payload), received_at), len(payload))
        elif kind == OPENED:
            if not channel._opened.done():
                channel._opened.set_result(None)
        elif kind == ENDED:
            del self.channels[cid]
            report = orjson.loads(payload)  # null: the transport failed (the child logged it)
            channel._end(Ended(report, "" if report else f"the {self.worker.name} receiver failed"))
            self.worker.release(self)


class Worker:
    """Receiver children of one kind (`python -m module`), started on demand: one for every
    channel (`channels_per_child=None`) or one per so many; a dead child is replaced on the
    next `open()` (its channels end with an error; their sessions reconnect)."""

    def __init__(
        self,
        module: str,
        *,
        name: str,
        channels_per_child: int | None = None,
        max_queued_bytes: int = MAX_QUEUED_BYTES,
        pause_at: int = PAUSE_AT,
        logger: logging.Logger = log,
    ) -> None:
        self.module = module
        self.name = name
        self.channels_per_child = channels_per_child
        self.max_queued_bytes = max_queued_bytes
        self.pause_at = pause_at
        self._logger = logger  # its level, when a child starts, is the child's log level
        self._children: list[_Child] = []
        self._retiring: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._starting = asyncio.Lock()
        #: exit codes of the children that have ended lately, oldest first
        self.exit_codes: deque[int] = deque(maxlen=EXIT_CODES_KEPT)

    async def __aenter__(self) -> Worker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def pids(self) -> list[int]:
        """The live children's process ids."""
        return [child.proc.pid for child in self._children if child.alive]

    async def open(self, spec: dict[str, Any]) -> Channel:
        """Open a channel as `spec` says (it may hold secrets: it travels on the child's
        stdin only); raises `Ended` if the transport cannot open it."""
        child = await self._with_room()
        channel = Channel(child, next(self._ids))
        child.channels[channel.id] = channel
        child.opened += 1
        child.write({"op": "open", "id": channel.id, "spec": spec})
        try:
            await channel._opened
        except BaseException:
            channel.close()
            raise
        return channel

    async def _with_room(self) -> _Child:
        async with self._starting:
            limit = self.channels_per_child
            for child in self._children:
                if child.alive and (limit is None or child.opened < limit):
                    return child
            self._children = [child for child in self._children if child.alive]
            child = _Child(self, await spawn(self.module))
            child.write({"log_level": self._logger.getEffectiveLevel()})
            self._children.append(child)
            return child

    def release(self, child: _Child) -> None:
        """A channel of `child` ended or was closed: a child that opened all it may and
        holds none now exits (given time to do so on its own)."""
        limit = self.channels_per_child
        retired = limit is not None and child.opened >= limit and not child.channels
        if retired and child in self._children:
            self._children.remove(child)
            task = asyncio.get_running_loop().create_task(self._retire(child))
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def _retire(self, child: _Child) -> None:
        child.stopping = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(EXIT_GRACE_S):
                await asyncio.shield(child.reader)
        await stop(child.proc)
        await child.reader

    async def close(self) -> None:
        """Stop every child (each closes its channels first). The worker can be used again."""
        children, self._children = self._children, []
        for child in children:
            child.stopping = True
        await asyncio.gather(*(stop(child.proc, grace_s=5.0) for child in children))
        await asyncio.gather(*(child.reader for child in children))
        await asyncio.gather(*list(self._retiring))


def _relog(doc: dict[str, Any]) -> None:
    logger = logging.getLogger(doc["name"])
    level = int(doc["level"])
    if logger.isEnabledFor(level):
        logger.log(level, "%s", redact(str(doc["msg"])))
