"""The VWAP stream's transport, in a receiver worker child of its own (one per stream):
the gRPC receive, blocking, on the child's one thread. Why a process and why no event loop:
docs/design.md, "VWAP over gRPC".

Started by the worker (`vwap_worker()`) as `python -m bridge.sources.vwap_receiver`; the
channel's spec is a `Job`, sent on stdin (the API key travels this way only).
"""

from __future__ import annotations

import base64
import contextlib
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Final

from bridge.sources.worker import Worker
from bridge.sources.worker_child import BlockingLink, serve_blocking

if TYPE_CHECKING:
    import grpc

METHOD: Final = "/kaikosdk.StreamAggregatesVWAPServiceV1/Subscribe"
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

    def to_spec(self) -> dict[str, Any]:
        certificates = self.root_certificates
        return {
            "target": self.target,
            "api_key": self.api_key,
            "root_certificates": certificates.decode() if certificates else None,
            "request": base64.b64encode(self.request).decode(),
            "options": self.options,
        }

    @classmethod
    def from_spec(cls, doc: dict[str, Any]) -> Job:
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


def vwap_worker() -> Worker:
    """The worker that gives each VWAP stream a child process of its own; open a stream
    with `Job.to_spec()`."""
    return Worker(__name__, name="gRPC", channels_per_child=1)


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


def relay(link: BlockingLink, spec: dict[str, Any]) -> dict[str, Any] | None:
    """Subscribe and hand on each response as it arrives, until the call ends: its `Status`,
    or None if the parent hung up (which cancels the call)."""
    try:
        status = _relay(link, Job.from_spec(spec))
    except (BrokenPipeError, ConnectionResetError):
        raise
    except Exception as exc:  # reported, not raised: the parent decides what to retry
        status = Status("UNKNOWN", f"gRPC receiver failed: {type(exc).__name__}: {exc}")
    # details unredacted: the parent redacts every error
    return None if status is None else asdict(status)


def _relay(link: BlockingLink, job: Job) -> Status | None:
    import grpc

    with secure_channel(job.target, job.api_key, job.root_certificates, job.options) as channel:
        # no (de)serializers: bytes in, bytes out; the parent decodes
        call: Any = channel.unary_stream(METHOD)(job.request)
        link.on_hangup = call.cancel
        if link.hung_up.is_set():
            call.cancel()
        data, gate, monotonic = link.data, link.gate, time.monotonic
        try:
            for msg in call:
                data(msg, monotonic())  # a full pipe blocks here: flow control holds the gateway
                if not gate.is_set():
                    gate.wait()
        except grpc.RpcError as exc:
            if link.hung_up.is_set():
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
    return None if link.hung_up.is_set() else Status("OK")


if __name__ == "__main__":
    if sys.stdin.isatty():
        sys.exit("started by the bridge (bridge.sources.vwap_receiver.vwap_worker), not by hand")
    serve_blocking(relay)
