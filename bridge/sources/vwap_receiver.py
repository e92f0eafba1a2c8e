"""The gRPC receive of a VWAP stream, in a child process of its own.

Why a process: grpc.aio's receive costs about 90 µs of CPU per message, most of it in
gRPC's completion queue and the hand-off from its poller thread to the event loop, all
under the GIL the rest of the bridge needs. In the bridge's own process, normalizing and
publishing queue behind it: 4.1k events/s end to end against 10k msgs/s for the receive
alone (bench/vwap.py). In a child, the receive has a core and a GIL of its own; the parent
gets the raw protobuf bytes over a pipe, many per read, and only parses, normalizes and
publishes. gRPC itself (channel, TLS, call credential, flow control) is unchanged: pushback
from Kafka stops the parent reading the pipe, which blocks the child's write, which stops
it reading the stream.

Why no event loop in the child: it has one call to read, and the blocking API reads it on
the calling thread (`SingleThreadedUnaryStream`), without grpc.aio's hand-off: about a
quarter less CPU per message (bench/vwap.py), which on a shared machine is throughput.

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
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import orjson

from bridge.errors import UpstreamError
from bridge.sources.childproc import HEADER, Frame, frames, ignore_interrupts, spawn, stop

if TYPE_CHECKING:
    import grpc

METHOD: Final = "/kaikosdk.StreamAggregatesVWAPServiceV1/Subscribe"
MESSAGE: Final = b"M"
STATUS: Final = b"S"
_PUSHBACK_KEY = "grpc-retry-pushback-ms"
#: a gRPC channel option: (name, value)
Option = tuple[str, Any]


@dataclass(frozen=True, slots=True)
class Job:
    """What the child needs to open the stream (sent on stdin, never in argv)."""

    target: str
    api_key: str
    root_certificates: bytes | None
    request: bytes  # a serialized StreamAggregatesVWAPRequestV1
    options: tuple[Option, ...]

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

    @property
    def returncode(self) -> int | None:
        """The child's exit code once it has ended (negative: the signal that ended it)."""
        return self._proc.returncode

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


def secure_channel(
    target: str, api_key: str, root_certificates: bytes | None, options: Iterable[Option]
) -> grpc.Channel:
    """A blocking channel over TLS, the API key its access token, whose streaming calls are
    read on the thread that iterates them (why: the module's docstring)."""
    import grpc
    import grpc.experimental

    credentials = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=root_certificates),
        grpc.access_token_call_credentials(api_key),
    )
    single_threaded = (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)
    return grpc.secure_channel(target, credentials, options=(*options, single_threaded))


def _relay(job: Job, write: Callable[[bytes], object]) -> Status | None:
    """Subscribe and `write` each response as it arrives, until the call ends; its status,
    or None if the parent hung up (closed stdin), which cancels the call."""
    import grpc

    with secure_channel(job.target, job.api_key, job.root_certificates, job.options) as channel:
        # no (de)serializers: bytes in, bytes out; the parent parses
        call: Any = channel.unary_stream(METHOD)(job.request)
        hangup = _Hangup(call)
        hangup.start()
        pack, monotonic = HEADER.pack, time.monotonic
        try:
            for msg in call:
                write(pack(MESSAGE, 0, len(msg), monotonic()) + msg)
        except grpc.RpcError as exc:
            if hangup.happened.is_set():
                return None
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


class _Hangup(threading.Thread):
    """Cancels the call once stdin closes: the parent hung up, or died."""

    def __init__(self, call: Any) -> None:
        super().__init__(name="hangup", daemon=True)
        self._call = call
        self.happened = threading.Event()

    def run(self) -> None:
        # The file descriptor, not sys.stdin: a thread blocked inside the buffered reader
        # holds its lock, and the interpreter's exit would wait for it, then abort.
        with contextlib.suppress(OSError):
            while os.read(sys.stdin.fileno(), 1 << 16):
                pass
        self.happened.set()
        self._call.cancel()


def main() -> None:
    """`python -m bridge.sources.vwap_receiver`: started by `Receiver`, not by hand.

    A blocking loop, no event loop: a full pipe blocks the write, which stops the reads,
    which lets gRPC's flow control hold the gateway back."""
    ignore_interrupts()
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)  # relayed by the parent
    out = sys.stdout.buffer
    job = Job.from_line(sys.stdin.buffer.readline())

    def write(frame: bytes) -> None:
        out.write(frame)
        out.flush()

    try:
        status = _relay(job, write)
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent is gone
    except Exception as exc:  # reported, not raised: the parent decides what to retry
        status = Status("UNKNOWN", f"gRPC receiver failed: {type(exc).__name__}: {exc}")
    if status is not None:
        payload = orjson.dumps(status)  # details unredacted: the parent redacts every error
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            write(HEADER.pack(STATUS, 0, len(payload), 0.0) + payload)


if __name__ == "__main__":
    main()
