"""Keeps sources running: one retry loop and one retry decision serve every source.

A source exposes `session(progress)`: one connection, from connect to end. It calls
`progress.delivered()` whenever the upstream delivers data, returns when the upstream
closes, and raises `UpstreamError` (or `AuthError`) when it fails. It never retries itself.

The supervisor restarts sessions with capped, jittered backoff (reset only after data came),
parks a source whose credentials were refused (one clear error, then a long wait, never a
hot loop), and owns every task: on stop, sources are cancelled and awaited.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiokafka.errors import KafkaError

from bridge import metrics
from bridge.backoff import Backoff
from bridge.errors import AuthError, PublishError, UpstreamError

log = logging.getLogger(__name__)

AUTH_RETRY_S = 300.0


@dataclass
class Progress:
    """What one session achieved; the supervisor reads it to decide on the next delay."""

    received: int = 0
    connected: bool = False
    on_connect: Callable[[], None] | None = field(default=None, repr=False)

    def delivered(self, count: int = 1) -> None:
        self.received += count

    def up(self) -> None:
        """The session is connected and subscribed (readiness counts it)."""
        self.connected = True
        if self.on_connect is not None:
            self.on_connect()


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


async def keep_running(
    source: Source,
    *,
    state: SourceState | None = None,
    backoff: Backoff | None = None,
    auth_retry_s: float = AUTH_RETRY_S,
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
        outcome = "the upstream closed the connection"
        delay: float | None = None
        try:
            await source.session(progress)
        except PublishError:
            raise  # Kafka is gone for good: let the service fail loudly
        except AuthError as exc:
            # Retrying soon cannot fix credentials: say so once, clearly, and wait long.
            log.error("%s: %s; next attempt in %.0fs", source.name, exc.message, auth_retry_s)  # noqa: TRY400
            state.last_error = str(exc)
            state.parked = True
            delay = auth_retry_s
        except UpstreamError as exc:
            outcome = exc.message if exc.source == source.name else str(exc)
            if exc.retry_after is not None:
                delay = exc.retry_after
        except (OSError, TimeoutError) as exc:
            outcome = f"{type(exc).__name__}: {exc}"
        except KafkaError as exc:
            outcome = f"Kafka: {exc}"
        except Exception as exc:
            # A bug, not the upstream: loud in the log, yet the other sources keep running.
            log.exception("%s: unexpected error in session", source.name)
            outcome = f"unexpected {type(exc).__name__}"
        finally:
            if progress.connected:
                state.connected = False
                connected.dec()
        if progress.received:
            backoff.reset()
        if delay is None:
            delay = backoff.next_delay()
            state.last_error = outcome
            log.warning("%s: %s; reconnecting in %.1fs", source.name, outcome, delay)
        reconnects.inc()
        await asyncio.sleep(delay)
