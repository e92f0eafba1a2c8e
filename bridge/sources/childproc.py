"""What the receiver child processes share: how the parent starts and stops one, and the
child's end of its stdin and stdout.

A receiver (`vwap_receiver`, `nav_receiver`) is `python -m <module>` with pipes on stdin,
stdout and stderr. The parent writes its commands (and any secret) on stdin, never in argv
or the environment; the child exits when stdin closes, so it never outlives the parent, and
ignores SIGINT (a Ctrl-C reaches the whole process group; the parent decides). Whatever the
child writes to stderr (a traceback, gRPC's own log lines) is logged by the parent, through
the same redaction as every log line, never printed raw.

The child writes frames on stdout: a 17-byte `HEADER` (kind, channel, payload length, the
CLOCK_MONOTONIC time the payload was received, shared by every process on the host), then
the payload. Kinds are each receiver's own; the channel tells a child's streams apart (0
when it has one).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import struct
import sys
from collections.abc import AsyncIterator
from typing import Final

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 2.0
#: The longest stderr line the parent logs (the rest is cut).
MAX_STDERR_LINE = 2000
_TOKEN = re.compile(r"(token=)[^&\s\"'#]*", re.IGNORECASE)
#: The severity letter that starts a gRPC (absl) log line: `E1204 16:30:00.123 ...`. gRPC's
#: own lines are for debugging it (a call's failure reaches the bridge as its status): DEBUG,
#: but for a fatal one.
_ABSL = re.compile(r"^([IWEF])\d{4} ")
_LEVELS = {"I": logging.DEBUG, "W": logging.DEBUG, "E": logging.DEBUG, "F": logging.CRITICAL}
_stderr_tasks: set[asyncio.Task[None]] = set()


def redact(text: str) -> str:
    """`text` with the value of every `token=` query parameter blanked."""
    return _TOKEN.sub(r"\1***", text) if "token=" in text.lower() else text


HEADER: Final = struct.Struct("<cIId")
#: kind, channel, payload, received-at
Frame = tuple[bytes, int, bytes, float]
_READ_SIZE = 1 << 18


async def spawn(module: str) -> asyncio.subprocess.Process:
    """Start `python -m module` with its stdin, stdout and stderr piped to us; its stderr
    lines are logged here (`relay_stderr`)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if proc.stderr is not None:
        task = asyncio.create_task(relay_stderr(proc.stderr, module.rpartition(".")[2]))
        _stderr_tasks.add(task)
        task.add_done_callback(_stderr_tasks.discard)
    return proc


async def relay_stderr(stderr: asyncio.StreamReader, name: str) -> None:
    """Log each line a child writes to stderr, redacted and cut, until it closes."""
    child_log = logging.getLogger(f"{__name__}.{name}")
    pending = b""
    while chunk := await stderr.read(1 << 16):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()[:MAX_STDERR_LINE]
        for line in lines:
            _log_line(child_log, line)
    if pending:
        _log_line(child_log, pending)


def _log_line(child_log: logging.Logger, line: bytes) -> None:
    text = redact(line[:MAX_STDERR_LINE].decode("utf-8", "replace").rstrip())
    if not text:
        return
    severity = _ABSL.match(text)
    level = _LEVELS[severity.group(1)] if severity else logging.WARNING
    child_log.log(level, "%s", text)


def ignore_interrupts() -> None:
    """In a child: Ctrl-C is for the parent, which hangs up when it wants the child gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


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
