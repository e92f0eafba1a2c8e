"""What the event loop reports about dropped work ("Future exception was never retrieved",
"Task was destroyed but it is pending!"): each an ERROR in the service's log."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator


@contextlib.asynccontextmanager
async def loop_reports() -> AsyncIterator[list[str]]:
    """The running loop's reports while the block runs and once what it dropped is collected
    after it, as "message: object". The loop is the session's: garbage of earlier tests is
    collected first, so that it is not reported here."""
    gc.collect()
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    reported: list[str] = []

    def report(_loop: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        what = context.get("future") or context.get("task")
        reported.append(f"{context.get('message')}: {what!r:.300}")

    loop.set_exception_handler(report)
    try:
        yield reported
        gc.collect()
        await asyncio.sleep(0)  # asyncio reports from the collector through the loop
    finally:
        loop.set_exception_handler(None)
