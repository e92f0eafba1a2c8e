"""The NAV sockets' transport, in the receiver worker's child: it holds every NAV WebSocket
and hands on what each received, decoded (`normalize.nav.decode_message`): ticks ready to
publish, refusals ready to dead-letter.

Started by the worker (`nav_receiver.nav_worker`) as `python -m bridge.sources.nav_receiver_child`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from dataclasses import asdict
from typing import Any

from bridge.normalize.nav import decode_message, tick_bytes
from bridge.sources.childproc import redact
from bridge.sources.nav_receiver import WS_LOG, SocketEnd
from bridge.sources.worker_child import Link, serve


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


async def _connect(url: str, options: dict[str, Any]) -> Any:
    """The open connection, or the `SocketEnd` that says why there is none (built from status
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
        return SocketEnd(
            status=response.status_code, retry_after=response.headers.get("Retry-After")
        )
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
    return SocketEnd(reason=reason)


def _lost(exc: Any) -> SocketEnd:
    """How a lost connection ended; a message over `max_size` is told apart (its size)."""
    from websockets.exceptions import PayloadTooBig

    cause = exc.__cause__
    if isinstance(cause, PayloadTooBig):
        size = (cause.size or 0) + (cause.current_size or 0)
        return SocketEnd(reason=f"a message over the size limit ({size} bytes)", too_large=size)
    return SocketEnd(reason=f"connection lost ({close_code(exc)})")


def close_code(exc: Any) -> str:
    """How a websockets `ConnectionClosed` ended, in words."""
    frame = exc.rcvd or exc.sent
    return f"code {frame.code}" if frame is not None else "no close frame"


async def relay(link: Link, spec: dict[str, Any]) -> dict[str, Any]:
    """One socket of `spec["symbol"]`, from connect to end; how it ended (a `SocketEnd`)."""
    from websockets.exceptions import ConnectionClosed, ConnectionClosedOK

    connection = await _connect(spec["url"], spec["options"])
    if isinstance(connection, SocketEnd):
        return asdict(connection)
    link.on_abort = connection.transport.abort
    link.opened()
    try:
        ended = await _receive(link, connection, spec["symbol"])
    except ConnectionClosedOK:
        ended = SocketEnd(ok=True)
    except ConnectionClosed as exc:
        ended = _lost(exc)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    except Exception as exc:  # reported, not raised
        ended = SocketEnd(reason=f"receive failed ({type(exc).__name__})")
        connection.transport.abort()
    return asdict(ended)


async def _receive(link: Link, connection: Any, symbol: str) -> SocketEnd:
    # The hot loop: one recv, decoded, one frame per tick or refusal, nothing else.
    recv = connection.recv
    frames = link.frames
    gate = link.gate
    data, refused = link.data, link.refused
    monotonic = time.monotonic
    while True:
        if not gate.is_set():
            await gate.wait()
        message = await recv(decode=False)
        received_at = monotonic()
        ticks, bad = decode_message(message, symbol)
        for event in ticks:
            data(tick_bytes(event), received_at)
        for refusal in bad:
            refused(refusal, received_at)
        if frames.full:
            await frames.drain()


if __name__ == "__main__":
    if sys.stdin.isatty():
        sys.exit("started by the bridge (bridge.sources.nav_receiver.nav_worker), not by hand")
    serve(relay)
