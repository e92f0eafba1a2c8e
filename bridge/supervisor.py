"""Keeps sources running: one retry loop and one retry decision for every source. A
source's `session(progress)` is one connection, from connect to end: it reports
`progress.up()` and `delivered()`, raises `UpstreamError` when it fails, and never retries
itself (backoff, parking, what counts as progress: docs/design.md, "Supervision")."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka.errors import KafkaError

from bridge import metrics
from bridge.backoff import Backoff
from bridge.errors import AuthError, PublishError, UpstreamError

log = logging.getLogger(__name__)

AUTH_RETRY_S = 300.0
#: A session connected this long counts as healthy even if the upstream said nothing. A
#: server that closes every silent connection just after that still sees at most 6 a minute.
HEALTHY_AFTER_S = 10.0


@dataclass
class Progress:
    """What one session achieved; the supervisor reads it to decide on the next delay."""

    received: int = 0
    connected: bool = False
    on_connect: Callable[[], None] | None = field(default=None, repr=False)
    connected_at: float | None = None  # time.monotonic() of the first `up()`

    def delivered(self, count: int = 1) -> None:
        """The connection delivered `count` records (not a back-fill from elsewhere)."""
        self.received += count

    def up(self) -> None:
        """The session is connected and subscribed (readiness counts it)."""
        self.connected = True
        if self.connected_at is None:
            self.connected_at = time.monotonic()
        if self.on_connect is not None:
            self.on_connect()

    def healthy(self, after_s: float) -> bool:
        """Data came, or the connection stayed up `after_s`: the backoff may start over."""
        if self.received:
            return True
        return self.connected_at is not None and time.monotonic() - self.connected_at >= after_s


class Source(Protocol):
    name: str

    async def session(self, progress: Progress) -> None: ...


@dataclass
class SourceState:
    """What readiness and the live view need to know about one source."""

    name: str
    connected: bool = False
    attempts: int = 0
    last_error: str = ""
    parked: bool = False


@dataclass
class _Ended:
    """How one session ended, as the retry decision needs it."""

    why: str = "the upstream closed the connection"
    retry_after: float | None = None
    refused: AuthError | None = None


async def _session(source: Source, progress: Progress) -> _Ended:
    """Run one session; translate how it ended. Only `PublishError` (and cancellation) pass."""
    try:
        await source.session(progress)
    except PublishError:
        raise  # Kafka is gone for good: let the service fail loudly
    except AuthError as exc:
        return _Ended(str(exc), refused=exc)
    except UpstreamError as exc:
        why = exc.message if exc.source == source.name else str(exc)
        return _Ended(why, exc.retry_after)
    except (OSError, TimeoutError) as exc:
        return _Ended(f"{type(exc).__name__}: {exc}")
    except KafkaError as exc:
        return _Ended(f"Kafka: {exc}")
    except Exception as exc:
        # A bug, not the upstream: loud in the log, yet the other sources keep running.
        log.exception("%s: unexpected error in session", source.name)
        return _Ended(f"unexpected {type(exc).__name__}")
    return _Ended()


async def keep_running(
    source: Source,
    *,
    state: SourceState | None = None,
    backoff: Backoff | None = None,
    auth_retry_s: float = AUTH_RETRY_S,
    healthy_after_s: float = HEALTHY_AFTER_S,
) -> None:
    """Run `source.session` forever, with backoff between sessions. Cancel to stop."""
    backoff = backoff or Backoff()
    state = state or SourceState(source.name)
    connected = metrics.CONNECTED.labels(source.name)
    reconnects = metrics.RECONNECTS.labels(source.name)

    def on_connect() -> None:
        state.connected = True
        state.parked = False
        connected.inc()

    while True:
        progress = Progress(on_connect=on_connect)
        state.attempts += 1
        try:
            ended = await _session(source, progress)
        finally:
            if progress.connected:
                state.connected = False
                connected.dec()
        if progress.healthy(healthy_after_s):
            backoff.reset()
        if ended.refused is not None:
            # Retrying soon cannot fix credentials: say so once, clearly, and wait long.
            refused = ended.refused
            log.error("%s: %s; next attempt in %.0fs", source.name, refused.message, auth_retry_s)
            state.last_error = ended.why
            state.parked = True
            delay = auth_retry_s
        else:
            delay = backoff.next_delay()
            why = ended.why
            if ended.retry_after is not None and ended.retry_after > delay:
                delay = ended.retry_after  # the upstream asked for longer than our backoff
                why = f"{why} (Retry-After {delay:g}s)"
            state.last_error = why
            log.warning("%s: %s; reconnecting in %.1fs", source.name, why, delay)
        reconnects.inc()
        await asyncio.sleep(delay)
