"""`kaiko-bridge completeness` against a real broker: a missing hour of an hourly NAV symbol is
named with its interval and the exit code is 3; VWAP intervals missing inside a gap event
are told apart and do not fail the check; a real-time symbol's long silence is missing."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.cli import main
from bridge.config import KafkaSettings
from bridge.events import VWAP_TICK, Event
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.normalize.vwap import SOURCE, gap_event, parse_rfc3339_ns
from bridge.publish import Publisher
from bridge.timefmt import iso_from_ms, iso_from_ns
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import (
    API_KEY,
    KAIKO_KEY,
    TOKEN,
    free_port,
    start_bridge,
    stop,
    wait_status,
    write_config,
)
from tests.kafkautil import read_topic, values

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


async def test_a_run_through_outages_is_complete_and_a_skipped_hour_is_named(
    kafka_settings: KafkaSettings, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The bridge against the simulators: a NAV outage (back-filled from REST) and a VWAP
    abort (a gap event) leave nothing missing outside gaps; an hour the upstream never
    produced (`VinterSim.skip`) is named, with its interval, and the exit code is 3."""
    ops_port = free_port()
    topics = kafka_settings.topics
    async with (
        VinterSim([HOURLY], token=TOKEN, api_key=API_KEY, rate=20, history_days=1) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=20) as kaiko,
    ):
        config = write_config(
            tmp_path, kafka_settings, vinter, kaiko, ops_port, nav=[HOURLY], daily=[]
        )
        proc = await start_bridge(config)
        try:
            await wait_status(f"http://127.0.0.1:{ops_port}/readyz", 200, timeout=60)
            # a new symbol starts after what REST had: the hours before are history
            since = len(vinter.emitted(HOURLY))
            await vinter.wait_emitted(HOURLY, since + 40, timeout=30)
            await vinter.drop_all("abrupt")  # a NAV outage: back-filled from REST
            await kaiko.close_connections(down_for=1.0)  # a VWAP abort: a gap event
            await vinter.wait_emitted(HOURLY, since + 80, timeout=60)
            (hole,) = vinter.skip(HOURLY)
            await vinter.wait_emitted(HOURLY, since + 120, timeout=60)
            vinter.rate = 0
            kaiko.stall()
            hours = [int(r["timestamp"]) for r in vinter.emitted(HOURLY)[since:]]
            seconds = [parse_rfc3339_ns(r.uid) // 1_000_000 for r in kaiko.sent]
            await read_topic(
                kafka_settings.bootstrap_servers,
                topics.nav_ticks,
                until=lambda found: any(hours[-1] == data_time(r.value) for r in found),
                timeout=60,
            )
            await read_topic(
                kafka_settings.bootstrap_servers,
                topics.vwap_ticks,
                until=lambda found: any(max(seconds) == data_time(r.value) for r in found),
                timeout=60,
            )
        finally:
            code, output = await stop(proc, config)
    assert code == 0, output[-3000:]
    bootstrap = kafka_settings.bootstrap_servers
    nav_docs = values(await read_topic(bootstrap, topics.nav_ticks, timeout=30))
    assert any(d["source"] == "/vinter/nav/rest" for d in nav_docs)  # the outage, back-filled
    vwap_docs = values(await read_topic(bootstrap, topics.vwap_ticks, timeout=30))
    assert any(d["type"] == "bridge.gap" for d in vwap_docs)  # the abort, reported

    nav_range = ["--from-time", str(hours[0]), "--to-time"]
    argv = ["completeness", topics.nav_ticks, "--bootstrap", kafka_settings.bootstrap_servers]
    assert await completeness([*argv, *nav_range, str(hole)]) == 0
    assert await completeness([*argv, *nav_range, str(hours[-1] + HOUR)]) == 3
    named = f"missing {HOURLY} [{iso_from_ms(hole)}, {iso_from_ms(hole + HOUR)})"
    assert named in capsys.readouterr().out

    argv[1] = topics.vwap_ticks
    vwap_range = ["--from-time", str(min(seconds)), "--to-time", str(max(seconds) + 1000)]
    assert await completeness([*argv, *vwap_range, "--json"]) == 0
    (report,) = orjson.loads(capsys.readouterr().out)["keys"]
    assert report["present"] == len(set(seconds))


def data_time(value: bytes | None) -> int | None:
    """The data time (Unix ms) of a NAV tick or a VWAP interval read back."""
    doc = orjson.loads(value or b"{}")
    data = doc.get("data") or {}
    if "uid" in data:
        return parse_rfc3339_ns(data["uid"]) // 1_000_000
    return data.get("timestamp")
