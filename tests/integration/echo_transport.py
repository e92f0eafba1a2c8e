"""A receiver worker transport for tests: it hands on the spec's `data` items, then ends
with the spec's `report`; a spec with `fail` raises instead, as a transport's bug would.
Started by the worker as `python -m tests.integration.echo_transport`."""

from __future__ import annotations

import time
from typing import Any

from bridge.sources.worker_child import Link, serve


async def relay(link: Link, spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("fail_before_open"):
        raise RuntimeError("broken before it opened")
    link.opened()
    for item in spec.get("data", []):
        link.data(item.encode(), time.monotonic())
    if spec.get("fail"):
        raise RuntimeError("broken after it opened")
    report: dict[str, Any] = spec.get("report", {})
    return report


if __name__ == "__main__":
    serve(relay)
