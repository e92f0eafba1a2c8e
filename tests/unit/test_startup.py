"""Start-up steps give way to a stop request (SIGTERM while Kafka is slow to answer)."""

from __future__ import annotations

import asyncio

import pytest

from bridge.app import _unless_stopped


async def test_stop_cancels_a_step_that_never_ends() -> None:
    stop = asyncio.Event()
    cancelled = asyncio.Event()

    async def endless() -> int:
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()
        return 1

    asyncio.get_running_loop().call_later(0.05, stop.set)
    async with asyncio.timeout(5):
        assert await _unless_stopped(endless(), stop) is None
    assert cancelled.is_set()


async def test_a_step_that_ends_gives_its_result_and_errors() -> None:
    stop = asyncio.Event()

    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> int:
        raise LookupError("no such topic")

    assert await _unless_stopped(answer(), stop) == 42
    with pytest.raises(LookupError, match="no such topic"):
        await _unless_stopped(fail(), stop)
