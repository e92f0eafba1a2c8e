from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable
from typing import TypedDict, Unpack

from bridge.backoff import Backoff
from bridge.errors import UpstreamError
from bridge.supervisor import Progress, keep_running


def test_grows_by_1_6_with_jitter_and_caps() -> None:
    backoff = Backoff()
    delays = [backoff.next_delay() for _ in range(20)]
    nominal = [min(1.6**i, 120.0) for i in range(20)]
    for delay, expected in zip(delays, nominal, strict=True):
        assert expected * 0.8 <= delay <= expected * 1.2
    assert max(delays) <= 144.0


def test_reset_starts_over() -> None:
    backoff = Backoff(jitter=0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0


# -- the supervisor's use of it ------------------------------------------------------------


class Recorded(Backoff):
    """A backoff that remembers every delay it handed out and every reset."""

    def __init__(self) -> None:
        super().__init__(initial=0.01, multiplier=2.0, jitter=0.0, cap=10.0)
        self.delays: list[float] = []
        self.resets = 0

    def next_delay(self) -> float:
        delay = super().next_delay()
        self.delays.append(delay)
        return delay

    def reset(self) -> None:
        self.resets += 1
        super().reset()


class Scripted:
    """A source whose every session runs `step` (a session of the supervisor's contract)."""

    name = "scripted"

    def __init__(self, step: Callable[[Progress], Awaitable[None]]) -> None:
        self.step = step
        self.starts: list[float] = []
        self.wanted = 0
        self.reached = asyncio.Event()

    async def session(self, progress: Progress) -> None:
        self.starts.append(time.monotonic())
        if len(self.starts) >= self.wanted:
            self.reached.set()
        await self.step(progress)


class Timings(TypedDict, total=False):
    """The supervisor's timing settings a test may override."""

    auth_retry_s: float
    healthy_after_s: float


async def sessions(
    source: Scripted, backoff: Backoff, count: int, **kwargs: Unpack[Timings]
) -> None:
    """Run `source` under the supervisor until it has started `count` sessions."""
    source.wanted = len(source.starts) + count
    task = asyncio.create_task(keep_running(source, backoff=backoff, **kwargs))
    try:
        async with asyncio.timeout(10):
            await source.reached.wait()
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_handshake_alone_is_not_progress() -> None:
    async def accept_then_close(progress: Progress) -> None:
        progress.up()

    backoff = Recorded()
    await sessions(Scripted(accept_then_close), backoff, 6)
    assert backoff.resets == 0
    assert backoff.delays[:5] == [0.01, 0.02, 0.04, 0.08, 0.16]


async def test_data_resets_the_backoff() -> None:
    async def deliver_then_drop(progress: Progress) -> None:
        progress.up()
        progress.delivered()
        raise UpstreamError("scripted", "connection lost (no close frame)")

    backoff = Recorded()
    await sessions(Scripted(deliver_then_drop), backoff, 5)
    assert backoff.delays[:4] == [0.01] * 4
    assert backoff.resets >= 4


async def test_a_quiet_connection_that_stayed_up_resets_the_backoff() -> None:
    async def quiet_then_drop(progress: Progress) -> None:
        progress.up()
        await asyncio.sleep(0.05)  # the length of the session, not a wait for a result

    backoff = Recorded()
    await sessions(Scripted(quiet_then_drop), backoff, 4, healthy_after_s=0.04)
    assert backoff.delays[:3] == [0.01] * 3


async def test_retry_after_is_a_floor_under_the_backoff() -> None:
    async def refused(progress: Progress) -> None:
        raise UpstreamError("scripted", "handshake refused with HTTP 429", retry_after=0.0)

    backoff = Recorded()
    await sessions(Scripted(refused), backoff, 5)
    assert backoff.delays[:4] == [0.01, 0.02, 0.04, 0.08]  # Retry-After: 0 is no hot loop

    async def slow_down(progress: Progress) -> None:
        raise UpstreamError("scripted", "handshake refused with HTTP 503", retry_after=0.2)

    source = Scripted(slow_down)
    await sessions(source, Recorded(), 3)
    for before, after in itertools.pairwise(source.starts):
        assert after - before >= 0.2
