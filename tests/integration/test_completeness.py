"""`kaiko-bridge completeness` against a real broker: a missing hour of an hourly NAV symbol is
named with its interval and the exit code is 3; VWAP intervals missing inside a gap event
are told apart and do not fail the check; a real-time symbol's long silence is missing."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from bridge.cli import main
from bridge.config import KafkaSettings
from bridge.events import VWAP_TICK, Event
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.normalize.vwap import SOURCE, gap_event
from bridge.publish import Publisher
from bridge.timefmt import iso_from_ms, iso_from_ns

pytestmark = pytest.mark.integration

HOUR = 3_600_000
T0 = 1_700_000_000_000 // HOUR * HOUR  # on the hour
HOURLY, REAL_TIME = "vnfa-btca-15-h", "vnfa-btca-15-r"
VWAP_KEY = "cbse:spot:btc-usd"


def nav(symbol: str, ts: int) -> Event:
    record = {
        "id": ts,
        "symbol": symbol,
        "created_at": iso_from_ms(ts),
        "value": 100.0,
        "timestamp": ts,
        "date": iso_from_ms(ts)[:10],
    }
    return nav_tick(record, source=SOURCE_WS)


def vwap(second: int) -> Event:
    ns = (T0 // 1000 + second) * 1_000_000_000
    uid = iso_from_ns(ns)
    return Event(
        VWAP_TICK,
        f"vwap:{VWAP_KEY}:1s:{uid}",
        SOURCE,
        uid,
        VWAP_KEY,
        {
            "exchange": "cbse",
            "instrument_class": "spot",
            "code": "btc-usd",
            "aggregate": "1s",
            "uid": uid,
            "price": 100.0,
            "ts_event": uid,
            "ts_event_ns": ns,
            "sequence_id": str(second),
        },
    )


async def publish(kafka: KafkaSettings) -> None:
    async with Publisher(kafka) as publisher:
        for hour in (0, 1, 2, 3, 5, 6, 7):  # hour 4 is missing
            await publisher.publish(nav(HOURLY, T0 + hour * HOUR))
        for second in [*range(30), *range(60, 90)]:  # 30 s of silence in a 1 s cadence
            await publisher.publish(nav(REAL_TIME, T0 + second * 1000))
        for second in [*range(5), *range(8, 20)]:  # 5, 6 and 7 lost, inside a gap event
            await publisher.publish(vwap(second))
        last_before, first_after = vwap(4).data["uid"], vwap(8).data["uid"]
        await publisher.publish(gap_event(VWAP_KEY, "1s", last_before, first_after, "reconnect"))
        await publisher.flush(30)


async def completeness(argv: list[str]) -> int:
    """`kaiko-bridge completeness ARGV` (its own event loop, so in a thread of its own)."""
    return await asyncio.to_thread(main, argv)


def check(topic: str, kafka: KafkaSettings, end_ms: int, *extra: str) -> list[str]:
    return [
        "completeness",
        topic,
        "--bootstrap",
        kafka.bootstrap_servers,
        "--from-time",
        str(T0),
        "--to-time",
        str(end_ms),
        *extra,
    ]


async def test_missing_intervals_are_named_and_those_inside_gaps_told_apart(
    kafka_settings: KafkaSettings, capsys: pytest.CaptureFixture[str]
) -> None:
    await publish(kafka_settings)

    nav_topic, vwap_topic = kafka_settings.topics.nav_ticks, kafka_settings.topics.vwap_ticks
    assert await completeness(check(nav_topic, kafka_settings, T0 + 8 * HOUR)) == 3
    out = capsys.readouterr().out
    assert f"missing {HOURLY} [{iso_from_ms(T0 + 4 * HOUR)}, {iso_from_ms(T0 + 5 * HOUR)})" in out
    real_time_gap = f"[{iso_from_ms(T0 + 29_000 + 1)}, {iso_from_ms(T0 + 60_000)})"
    assert f"missing {REAL_TIME} {real_time_gap}" in out
    assert await completeness(check(nav_topic, kafka_settings, T0 + 4 * HOUR, "--key", HOURLY)) == 0
    capsys.readouterr()

    assert await completeness(check(vwap_topic, kafka_settings, T0 + 20_000, "--json")) == 0
    doc: dict[str, Any] = orjson.loads(capsys.readouterr().out)
    (report,) = doc["keys"]
    assert report["key"] == f"{VWAP_KEY}|1s"
    assert (report["expected"], report["present"]) == (20, 17)
    assert report["missing"] == []
    assert report["in_gaps"] == [{"start": T0 + 5000, "end": T0 + 8000}]
    assert doc["complete"] is True
    # one second more: the interval at 20 s is asked for, and there is none
    assert await completeness(check(vwap_topic, kafka_settings, T0 + 21_000)) == 3
    assert f"missing {VWAP_KEY}|1s [{iso_from_ms(T0 + 20_000)}" in capsys.readouterr().out
