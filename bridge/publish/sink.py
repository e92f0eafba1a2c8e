"""What the sources' sinks publish through: the shared idempotent `Publisher`, or a shard's
transactional `ShardPublisher` (the same calls, so a sink does not know which)."""

from __future__ import annotations

from typing import Protocol

from bridge.events import Event, Headers


class EventSink(Protocol):
    def topic_for(self, event_type: str) -> str: ...

    async def publish(self, event: Event, received_at: float | None = None) -> None: ...

    async def send(
        self,
        topic: str,
        key: str,
        value: bytes,
        headers: Headers,
        received_at: float | None = None,
    ) -> None: ...

    async def dead_letter(
        self,
        *,
        source: str,
        raw: bytes | str,
        reason: str,
        detail: str = "",
        key: str | None = None,
        event_type: str | None = None,
    ) -> None: ...

    async def persist_marks(self) -> None:
        """Make the marks of what was published so far durable before going on: a
        subscription's first event waits for this, so that its start is never lost."""
