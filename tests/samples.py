"""Upstream records and events shaped like the vendor docs' samples, for tests."""

from __future__ import annotations

from typing import Any

from bridge.events import Event
from bridge.normalize.nav import SOURCE_WS, nav_tick

DAILY: dict[str, Any] = {
    "id": 2068,
    "symbol": "vnfa-btca-15-d",
    "created_at": "2023-02-28T00:00:00.000Z",
    "open": 99.45,
    "low": 98.23,
    "high": 100.04,
    "close": 98.63,
    "timestamp": 1677542400000,
    "date": "2023-02-28",
    "updated_at": "2023-02-28T00:00:00.000Z",
}
HOURLY: dict[str, Any] = {
    "id": 49104,
    "symbol": "vnfa-btca-15-h",
    "created_at": "2023-03-01T08:00:00.000Z",
    "open": 100.72,
    "low": 100.61,
    "high": 100.97,
    "close": 100.83,
    "timestamp": 1677657600000,
    "date": "2023-03-01",
    "hour": 8,
}
REALTIME: dict[str, Any] = {
    "id": 7,
    "symbol": "vnfa-btca-15-r",
    "created_at": "2023-03-01T08:00:01.000Z",
    "value": 100.8,
    "timestamp": 1677657601000,
    "date": "2023-03-01",
}


def nav_record(symbol: str, timestamp: int, value: float = 100.0) -> dict[str, Any]:
    return {**REALTIME, "symbol": symbol, "timestamp": timestamp, "value": value}


def nav_event(symbol: str, timestamp: int, value: float = 100.0) -> Event:
    return nav_tick(nav_record(symbol, timestamp, value), source=SOURCE_WS)


# Every field a NAV record carries, for tests that mutate or drop them.
NAV_FIELDS = [
    "id",
    "symbol",
    "timestamp",
    "open",
    "high",
    "low",
    "close",
    "value",
    "date",
    "hour",
    "created_at",
    "updated_at",
]
