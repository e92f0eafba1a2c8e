"""Stopping tasks and library clients without losing the stopper's own cancellation.

`task.cancel(); with suppress(CancelledError): await task` swallows the caller's own
cancellation when it arrives during that wait (the CancelledError caught is the caller's),
and aiokafka's `stop()` methods do the same inside: a supervisor cancelling a shard that
is stopping a consumer could wait forever on a task that had forgotten it was cancelled.
`asyncio.wait` never forwards nor swallows a cancellation, so both helpers wait with it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Stops still running after their caller stopped waiting (kept referenced until done).
_lingering: set[asyncio.Future[Any]] = set()


def _retrieve(future: asyncio.Future[Any]) -> None:
    _lingering.discard(future)
    if not future.cancelled() and future.exception() is not None:
        log.debug("a stop left running ended with %r", future.exception())


def observed(future: asyncio.Future[T]) -> asyncio.Future[T]:
    """`future` with its failure marked as read whatever happens to its holder: a send
    whose batch is abandoned (a later send raised first) fails without an ERROR log."""
    future.add_done_callback(_read_outcome)
    return future


def _read_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


async def cancel_and_wait(task: asyncio.Future[Any], timeout: float | None = None) -> bool:
    """Cancel `task` and wait up to `timeout` for it to end; True when it has ended. Its
    exception, if any, is retrieved and dropped: the caller wanted it gone."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done:
        if not task.cancelled():
            task.exception()
        return True
    _lingering.add(task)
    task.add_done_callback(_retrieve)
    return False


async def stop_within(stop: Awaitable[None], timeout: float) -> bool:
    """Run a client's `stop()` in a task of its own and wait up to `timeout`; True when it
    finished (its errors are raised). Past the timeout, or when the caller is cancelled, the
    stop goes on in the background: a client cannot hold its caller past the deadline."""
    task = asyncio.ensure_future(stop)
    _lingering.add(task)
    task.add_done_callback(_retrieve)
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if task in done:
        task.result()
        return True
    return False
