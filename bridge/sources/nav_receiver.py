"""The NAV sockets' receiver: every NAV WebSocket is held by one child process of the
receiver worker (`nav_receiver_child`), which decodes what each received.

Why a child, and its flow control: docs/design.md, "NAV over WebSocket".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Final

from bridge.errors import AuthError, UpstreamError
from bridge.sources.worker import MAX_QUEUED_BYTES, Ended, Worker

__all__ = ["WS_LOG", "SocketEnd", "nav_worker"]

CHILD_MODULE: Final = "bridge.sources.nav_receiver_child"

#: The logger handed to websockets (in the child; the parent re-logs its records under the
#: same name). Its filter blanks the token: at DEBUG websockets logs the request line.
WS_LOG: Final = logging.getLogger(f"{__name__}.websocket")

#: The longest Retry-After of a refused handshake the source honours.
MAX_RETRY_AFTER_S: Final = 300.0


def nav_worker(*, max_queued_bytes: int = MAX_QUEUED_BYTES) -> Worker:
    """The worker whose one child holds every NAV socket. Open a socket with the spec
    `{"url", "options" (websockets `connect` options), "symbol"}`."""
    return Worker(
        CHILD_MODULE,
        name="NAV WebSocket",
        max_queued_bytes=max_queued_bytes,
        logger=WS_LOG,
    )


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return min(max(float(value), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        return None  # an HTTP-date: our own backoff will do


@dataclass(frozen=True)
class SocketEnd:
    """How a socket ended (or why it never opened). `ok`: a clean close by the server. `status` and
    `retry_after`: the HTTP refusal of the handshake. `reason`: what else happened, in words
    that never quote the URL."""

    ok: bool = False
    status: int | None = None
    retry_after: str | None = None
    reason: str = ""
    too_large: int | None = None  # the size of a message over `max_size` (closed with 1009)

    @classmethod
    def of(cls, ended: Ended) -> SocketEnd:
        """How the worker's channel ended, as the socket's transport told (or the child's
        death, in words)."""
        if ended.report is None:
            return cls(reason=ended.reason)
        return cls(**ended.report)

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
