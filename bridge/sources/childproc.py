"""What the receiver child processes share: how the parent starts and stops one, and the
child's end of its stdin and stdout.

A receiver (`vwap_receiver`, `nav_receiver`) is `python -m <module>` with pipes on stdin and
stdout. The parent writes its commands (and any secret) on stdin, never in argv or the
environment; the child exits when stdin closes, so it never outlives the parent.

The child writes frames on stdout: a 17-byte `HEADER` (kind, channel, payload length, the
CLOCK_MONOTONIC time the payload was received, shared by every process on the host), then
the payload. Kinds are each receiver's own; the channel tells a child's streams apart (0
when it has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import sys
from collections.abc import AsyncIterator
from typing import Final

CLOSE_GRACE_S = 2.0
HEADER: Final = struct.Struct("<cIId")
#: kind, channel, payload, received-at
Frame = tuple[bytes, int, bytes, float]
_READ_SIZE = 1 << 18


async def spawn(module: str) -> asyncio.subprocess.Process:
    """Start `python -m module` with stdin and stdout piped to us (stderr inherited)."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )


async def stop(proc: asyncio.subprocess.Process, grace_s: float = CLOSE_GRACE_S) -> None:
    """Hang up: close its stdin (the child winds down and exits), kill it if it lingers."""
    if proc.returncode is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()


async def frames(stdout: asyncio.StreamReader) -> AsyncIterator[list[Frame]]:
    """The child's frames, as many as each pipe read holds, until it closes its stdout."""
    read = stdout.read
    unpack = HEADER.unpack_from
    size = HEADER.size
    pending = b""
    while chunk := await read(_READ_SIZE):
        data = pending + chunk if pending else chunk
        end = len(data)
        pos = 0
        batch: list[Frame] = []
        while end - pos >= size:
            kind, channel, length, received_at = unpack(data, pos)
            start = pos + size
            if end - start < length:
                break
            pos = start + length
            batch.append((kind, channel, data[start:pos], received_at))
        pending = data[pos:]
        if batch:
            yield batch


class Pipe(asyncio.Protocol):
    """Stdout's write side with flow control: `drain()` waits while the pipe is full.

    The stdlib's `StreamWriter` over a pipe would need its undocumented `FlowControlMixin`.
    """

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


async def stdio() -> tuple[asyncio.StreamReader, asyncio.WriteTransport, Pipe]:
    """The child's stdin as a stream, and its stdout as a transport with flow control."""
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    out, pipe = await loop.connect_write_pipe(Pipe, sys.stdout)
    return stdin, out, pipe
