"""The gRPC receive of a VWAP stream, in a child process of its own.

Why a process: grpc.aio's receive costs about 90 µs of CPU per message, most of it in
gRPC's completion queue and the hand-off from its poller thread to the event loop, all
under the GIL the rest of the bridge needs. In the bridge's own process, normalizing and
publishing queue behind it: 4.1k events/s end to end against 10k msgs/s for the receive
alone (bench/vwap.py). In a child, the receive has a core and a GIL of its own; the parent
gets the raw protobuf bytes over a pipe, many per read, and only parses, normalizes and
publishes. gRPC itself (channel, TLS, call credential, flow control) is unchanged: pushback
from Kafka stops the parent reading the pipe, which stops the child reading the stream.

The protocol, parent -> child: one JSON line on stdin (`Job`), which stays open; the child
cancels its call and exits when stdin closes, so it never outlives the parent. The API key
travels this way only, never in argv or the environment.

Child -> parent, on stdout: `childproc` frames, on channel 0:

    M  one response, serialized as received
    S  the call ended: JSON {"code", "details", "pushback_ms"}; code "OK" for a clean end
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Final

import orjson

from bridge.errors import UpstreamError
from bridge.sources.childproc import HEADER, Frame, Pipe, frames, spawn, stdio, stop

METHOD: Final = "/kaikosdk.StreamAggregatesVWAPServiceV1/Subscribe"
MESSAGE: Final = b"M"
STATUS: Final = b"S"
_PUSHBACK_KEY = "grpc-retry-pushback-ms"


@dataclass(frozen=True, slots=True)
class Job:
    """What the child needs to open the stream (sent on stdin, never in argv)."""

    target: str
    api_key: str
    root_certificates: bytes | None
    request: bytes  # a serialized StreamAggregatesVWAPRequestV1
    options: tuple[tuple[str, Any], ...]

    def __repr__(self) -> str:
        return f"Job(target={self.target!r})"

    def to_line(self) -> bytes:
        certificates = self.root_certificates
        return orjson.dumps(
            {
                "target": self.target,
                "api_key": self.api_key,
                "root_certificates": certificates.decode() if certificates else None,
                "request": base64.b64encode(self.request).decode(),
                "options": self.options,
            },
            option=orjson.OPT_APPEND_NEWLINE,
        )

    @classmethod
    def from_line(cls, line: bytes) -> Job:
        doc = orjson.loads(line)
        certificates = doc["root_certificates"]
        return cls(
            target=doc["target"],
            api_key=doc["api_key"],
            root_certificates=certificates.encode() if certificates else None,
            request=base64.b64decode(doc["request"]),
            options=tuple((name, value) for name, value in doc["options"]),
        )


@dataclass(frozen=True, slots=True)
class Status:
    """How the child's call ended: a gRPC status code name, details, server pushback."""

    code: str
    details: str = ""
    pushback_ms: int | None = None


# -- the parent's end --------------------------------------------------------------------


class Receiver:
    """A running child process and its frames: `async with Receiver.running(job, name)`."""

    def __init__(self, proc: asyncio.subprocess.Process, name: str) -> None:
        if proc.stdin is None or proc.stdout is None:
            raise TypeError("the receiver process needs stdin and stdout pipes")
        self._proc = proc
        self._stdin = proc.stdin
        self._stdout = proc.stdout
        self._name = name
        #: how the call ended, once `batches()` has returned
        self.status: Status | None = None

    @classmethod
    @contextlib.asynccontextmanager
    async def running(cls, job: Job, name: str) -> AsyncIterator[Receiver]:
        """Start the child for `job`; stop it on the way out, whatever happened."""
        proc = await spawn(__name__)
        receiver = cls(proc, name)
        try:
            receiver._stdin.write(job.to_line())
            yield receiver
        finally:
            await receiver.close()

    async def close(self) -> None:
        """Hang up: close stdin (the child cancels its call), kill it if it lingers."""
        await stop(self._proc)

    async def batches(self) -> AsyncIterator[list[Frame]]:
        """The child's frames of responses (kind, 0, serialized response, received-at), as
        many as each pipe read holds; `status` is set when the call ends. A child that dies
        without reporting one is an UpstreamError."""
        async for batch in frames(self._stdout):
            kind, _, payload, _ = batch[-1]
            if kind == STATUS:  # the child's last frame
                self.status = Status(**orjson.loads(payload))
                batch.pop()
            if batch:
                yield batch
            if self.status is not None:
                return
        code = await self._proc.wait()
        raise UpstreamError(self._name, f"the gRPC receiver exited with code {code}")


# -- the child's end ---------------------------------------------------------------------


async def _relay(job: Job, out: asyncio.WriteTransport, pipe: Pipe) -> Status:
    """Subscribe and write each response to `out` as it arrives; the call's status."""
    import grpc

    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=job.root_certificates),
        grpc.access_token_call_credentials(job.api_key),
    )
    async with grpc.aio.secure_channel(job.target, credentials, options=job.options) as channel:
        # no (de)serializers: bytes in, bytes out; the parent parses
        call: Any = channel.unary_stream(METHOD)(job.request)
        read, eof = call.read, grpc.aio.EOF
        write, pack, monotonic = out.write, HEADER.pack, time.monotonic
        try:
            while (msg := await read()) is not eof:
                write(pack(MESSAGE, 0, len(msg), monotonic()) + msg)
                if out.get_write_buffer_size():
                    await pipe.drain()
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            pushback = None
            for key, value in exc.trailing_metadata() or ():
                if key == _PUSHBACK_KEY:
                    with contextlib.suppress(TypeError, ValueError):
                        pushback = int(value)
            return Status(getattr(code, "name", str(code)), exc.details() or "", pushback)
        finally:
            call.cancel()
    return Status("OK")


async def _child() -> None:
    stdin, out, pipe = await stdio()
    job = Job.from_line(await stdin.readline())
    relay = asyncio.create_task(_relay(job, out, pipe))
    hangup = asyncio.create_task(stdin.read())  # returns at EOF: the parent hung up
    await asyncio.wait((relay, hangup), return_when=asyncio.FIRST_COMPLETED)
    if not relay.done():
        relay.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await relay
        return
    hangup.cancel()
    try:
        status = relay.result()
    except Exception as exc:  # reported, not raised: the parent decides what to retry
        status = Status("UNKNOWN", f"gRPC receiver failed: {type(exc).__name__}: {exc}")
    payload = orjson.dumps(status)  # details unredacted: the parent redacts every error
    out.write(HEADER.pack(STATUS, 0, len(payload), 0.0) + payload)
    out.close()  # flushes what is buffered first
    await pipe.closed


def main() -> None:
    """`python -m bridge.sources.vwap_receiver`: started by `Receiver`, not by hand."""
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    from bridge.loop import run_loop

    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        run_loop(_child())


if __name__ == "__main__":
    main()
