"""The bridge itself failing: SIGKILLed three times under load and restarted each time.

State survives in Kafka only (marks recovered from checkpoints plus the output log,
settlement checkpoints committed with their events), so the restarted process must
neither repeat nor skip: NAV gaps are back-filled over REST, VWAP intervals it could not
see are reported as `bridge.gap`, settlements are committed exactly once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bridge.config import KafkaSettings
from bridgedev.localkafka import LocalKafkaCluster
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import API_KEY, KAIKO_KEY, TOKEN
from tests.faults.checker import settlement_window_start
from tests.faults.harness import (
    DAILY,
    NAV,
    BridgeProcess,
    PacedLoad,
    backfilled,
    counter,
    new_bridge,
    running,
    settle,
)

EVENTS = 15_000
RATE = 250.0
KILLS = 3
STEP = 0.2  # at least this much of the load between two kills
BACKFILL_DAYS = 5


@dataclass
class Kill:
    at: int  # NAV records sent when the bridge was killed
    ready_s: float  # restart to /readyz 200


async def wait_until_published(bridge: BridgeProcess, topic: str, timeout: float = 60.0) -> None:
    """Wait until this bridge process has had a NAV event acknowledged (its metrics start at
    zero), so that the next kill hits a process that was working."""
    async with asyncio.timeout(timeout):
        while True:
            if counter(await bridge.metrics(), "bridge_events_published", topic=topic) >= 1:
                return
            await asyncio.sleep(0.2)


@pytest.mark.timeout(420)
async def test_bridge_sigkilled_three_times_repeats_and_loses_nothing(
    cluster: LocalKafkaCluster, cluster_settings: KafkaSettings, tmp_path: Path
) -> None:
    """15k NAV events at 250 ev/s; the bridge is SIGKILLed at 20 % of the load or later,
    then again at least 20 % further on each time (and only once the restarted process has
    published), three times, and restarted at once. Afterwards: every NAV record once, no
    VWAP interval twice and every missing one inside a reported gap, every settlement
    revision exactly once; no secret in logs, records or /metrics."""
    settings = cluster_settings
    topics = settings.topics
    since = settlement_window_start(datetime.now(UTC), BACKFILL_DAYS)
    async with (
        VinterSim(
            [*NAV, *DAILY], token=TOKEN, api_key=API_KEY, history_days=BACKFILL_DAYS
        ) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=50, resend_on_reconnect=5) as kaiko,
    ):
        bridge = new_bridge(
            tmp_path,
            settings,
            vinter,
            kaiko,
            nav=NAV,
            daily=DAILY,
            settlement={"backfill_days": BACKFILL_DAYS},
        )
        async with running(bridge):
            first_ready_s = await bridge.wait_ready()
            load = PacedLoad(vinter, NAV, RATE)
            yesterday = str(vinter.history(DAILY[0])[-1]["date"])
            kills: list[Kill] = []
            began = time.monotonic()
            async with asyncio.TaskGroup() as group:
                group.create_task(load.send(EVENTS))
                next_at = STEP * EVENTS
                for i in range(KILLS):
                    vinter.correct(DAILY[0], yesterday, close=3000.0 + i)  # a new revision
                    await load.reached(int(next_at), timeout=120)
                    at = load.sent
                    await bridge.kill()
                    await bridge.start()
                    ready_s = await bridge.wait_ready(timeout=120)
                    kills.append(Kill(at, ready_s))
                    await wait_until_published(bridge, topics.nav_ticks)
                    next_at = max(load.sent, at + STEP * EVENTS)
                vinter.correct(DAILY[0], yesterday, close=3999.0)
            load_s = time.monotonic() - began
            end = await settle(bridge, settings, vinter, kaiko, since_ms=since)
    verdict, output = end.final, end.output

    print(f"first start ready in {first_ready_s:.1f}s; {load.sent} NAV events in {load_s:.1f}s")
    for kill in kills:
        print(
            f"SIGKILL at {kill.at} NAV events ({kill.at / EVENTS:.0%}), "
            f"ready again {kill.ready_s:.1f}s later"
        )
    print(verdict.summary())
    print(f"{backfilled(output)} NAV records back-filled over REST after the restarts")
    end.assert_clean()
    assert output.count("bridge started") == KILLS + 1
    assert len(kills) == KILLS
    kill_points = [k.at for k in kills]
    spacing = [b - a for a, b in zip([0, *kill_points[:-1]], kill_points, strict=True)]
    assert all(s >= STEP * EVENTS for s in spacing), spacing
    assert kills[-1].at < EVENTS, "the load ended before the last kill"
    nav, vwap, settlements = verdict.checks
    assert nav.found == EVENTS
    assert vwap.found > 0
    assert vwap.gaps >= 1, "no bridge.gap after a restart"
    assert settlements.found > BACKFILL_DAYS
