"""A stopper's own cancellation survives a client whose `stop()` swallows cancellations, and
an abandoned send that fails logs no "exception was never retrieved"."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

import pytest

from bridge.tasks import cancel_and_wait, observed, stop_within
from tests.loopreports import loop_reports


async def _lingering_worker() -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await asyncio.sleep(0.3)  # its goodbye, as a fetch task closing a connection


async def _swallowing_stop(stopping: asyncio.Event) -> None:
    """aiokafka's shape: cancel the worker, then wait for it with CancelledError suppressed."""
    worker = asyncio.create_task(_lingering_worker())
    await asyncio.sleep(0)
    worker.cancel()
    stopping.set()
    with contextlib.suppress(asyncio.CancelledError):
        await worker


async def _plain(stop: Awaitable[None]) -> None:
    await stop


async def _within(stop: Awaitable[None]) -> None:
    await stop_within(stop, timeout=5)


async def _caller_ends(how: Callable[[Awaitable[None]], Awaitable[None]]) -> str:
    """Cancel a caller while it is inside the stop; how did the caller end?"""
    stopping = asyncio.Event()

    async def caller() -> str:
        await how(_swallowing_stop(stopping))
        return "went on"

    task = asyncio.create_task(caller())
    await asyncio.wait_for(stopping.wait(), 5)
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.done()
    return "cancelled" if task.cancelled() else task.result()


async def test_a_plain_await_of_such_a_stop_loses_the_callers_cancellation() -> None:
    # the hazard itself, so that the test below is known to exercise it
    assert await _caller_ends(_plain) == "went on"


async def test_stop_within_keeps_the_callers_cancellation() -> None:
    assert await _caller_ends(_within) == "cancelled"


async def test_stop_within_gives_up_at_its_timeout_and_raises_the_stops_errors() -> None:
    assert await stop_within(asyncio.sleep(10), timeout=0.05) is False

    async def failing() -> None:
        raise RuntimeError("broken")

    with pytest.raises(RuntimeError, match="broken"):
        await stop_within(failing(), timeout=1)


async def test_cancel_and_wait_ends_a_task_and_tells_when_one_will_not_end() -> None:
    assert await cancel_and_wait(asyncio.create_task(asyncio.sleep(10)), 1) is True

    async def stubborn() -> None:
        for _ in range(100):
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0.01)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    assert await cancel_and_wait(task, 0.05) is False
    assert not task.done()
    await asyncio.wait({task}, timeout=5)
    assert task.done()


async def test_cancel_and_wait_keeps_the_callers_cancellation() -> None:
    waiting = asyncio.Event()

    async def caller() -> None:
        inner = asyncio.create_task(_lingering_worker())
        await asyncio.sleep(0)
        waiting.set()
        await cancel_and_wait(inner, 5)

    task = asyncio.create_task(caller())
    await asyncio.wait_for(waiting.wait(), 5)
    task.cancel()
    await asyncio.wait({task}, timeout=5)
    assert task.cancelled()


async def _abandoned_failure(wrap: Callable[[asyncio.Future[None]], object]) -> list[str]:
    """What the loop reports when a failed future nobody awaited is collected."""
    async with loop_reports() as reports:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        wrap(future)
        future.set_exception(OSError("the batch was abandoned"))
        await asyncio.sleep(0)  # its done callbacks run
        del future
    return [report.partition(":")[0] for report in reports]


async def test_an_observed_future_that_fails_unawaited_is_not_reported() -> None:
    assert await _abandoned_failure(lambda f: f) == ["Future exception was never retrieved"]
    assert await _abandoned_failure(observed) == []
