"""The soak's full outage: every broker SIGKILLed for 60 s under load with three replicas.

Meanwhile every replica says 503 on /readyz and the memory of every process, receiver
children included, stays bounded (at most `max_in_flight` events wait). Within 10 s of the
brokers' return every replica is ready and every NAV symbol publishes again (asserted);
then Kafka holds everything the simulators sent, read_committed, once.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.config import KafkaSettings
from bridgedev.localkafka import LocalKafkaCluster
from tests.faults.checker import against_simulators, settlement_window_start
from tests.faults.harness import BridgeProcess, PacedLoad, counter
from tests.faults.replicas import group, readiness, simulators, wait_shared
from tests.faults.soak import Memory, NavTail, newest_emitted
from tests.faults.test_soak import report

SHARDS = 12
NAV = [f"down{i:02d}-r" for i in range(12)]
DAILY = ["vnfa-btca-15-d"]
RATE = 250.0
OUTAGE_S = 60.0
IN_FLIGHT = 5_000  # max_in_flight: reached early in the outage, so the bound is tested
BACK_WITHIN_S = 10.0
BACKFILL_DAYS = 3
CONFIG: dict[str, Any] = {  # each replica's, as `replica` takes it
    "nav": NAV,
    "daily": DAILY,
    "shards": SHARDS,
    "settlement": {"backfill_days": BACKFILL_DAYS},
    "kafka": {"max_in_flight": IN_FLIGHT},
}


async def all_ready(bridges: list[BridgeProcess], timeout: float) -> float:
    """Wait until every replica answers /readyz 200; returns when."""
    async with asyncio.timeout(timeout):
        while True:
            if all([(await readiness(b)).get("ok") for b in bridges]):
                return time.monotonic()
            await asyncio.sleep(0.1)  # polling across processes: no event to wait on


def spread(values: list[float]) -> float:
    return max(values) - min(values) if values else 0.0


@pytest.mark.timeout(900)
async def test_all_brokers_down_for_a_minute_under_three_replicas(
    cluster: LocalKafkaCluster, cluster_settings: KafkaSettings, tmp_path: Path
) -> None:
    settings = cluster_settings
    since = settlement_window_start(datetime.now(UTC), BACKFILL_DAYS)
    async with simulators([*NAV, *DAILY], BACKFILL_DAYS, kaiko_rate=20, resend=5) as sims:
        vinter, kaiko = sims
        bridges = group(tmp_path, settings, vinter, kaiko, **CONFIG)
        tail = NavTail(settings.bootstrap_servers, settings.topics.nav_ticks)
        memory = Memory(bridges)
        load = PacedLoad(vinter, NAV, RATE)
        try:
            for bridge in bridges:
                await bridge.start()
            await wait_shared(bridges, SHARDS, timeout=180)
            following = asyncio.create_task(tail.follow())
            loading = asyncio.create_task(load.send(10**9))
            await load.reached(int(RATE * 5), timeout=60)
            before = memory.sample()
            began = time.monotonic()
            await asyncio.to_thread(cluster.kill)
            ready: list[tuple[float, list[bool]]] = []
            while (at := time.monotonic() - began) < OUTAGE_S:
                ready.append((at, [bool((await readiness(b)).get("ok")) for b in bridges]))
                memory.sample()
                await asyncio.sleep(1.0)  # the sampling period
            during = [dict(s) for t, s in memory.samples if t >= began]
            await asyncio.to_thread(cluster.start)
            back = time.monotonic()
            last_sent = newest_emitted(vinter, NAV)
            ready_at = await all_ready(bridges, timeout=120)
            flowing_at = await tail.fresh(last_sent, timeout=120)
            caught_up_at = await tail.caught_up(
                lambda: {f"nav:{s}:{r['timestamp']}:1" for s in NAV for r in vinter.emitted(s)},
                timeout=180,
            )
            loading.cancel()
            following.cancel()
            kaiko.stall()
            compare = against_simulators(
                settings, vinter, kaiko, nav=NAV, daily=DAILY, since_ms=since
            )
            verdict = await compare(timeout=180)
            texts = [await b.metrics() for b in bridges]
        finally:
            codes = [await b.terminate() for b in bridges]

    first_503 = [next((t for t, oks in ready if not oks[i]), None) for i in range(3)]
    peaks = {k: max(s.get(k, 0.0) for s in during) for k in before}
    growth = {k: round(peaks[k] - before[k]) for k in before}
    half = [s for t, s in memory.samples if began + OUTAGE_S / 2 <= t <= began + OUTAGE_S]
    late = {
        k: round(max(s.get(k, 0.0) for s in half) - min(s.get(k, 0.0) for s in half))
        for k in before
    }
    print(verdict.summary())
    report(
        "all brokers down",
        {
            "outage_s": OUTAGE_S,
            "first_503_s": [None if t is None else round(t, 1) for t in first_503],
            "ready_after_return_s": round(ready_at - back, 1),
            "publishing_after_return_s": round(flowing_at - back, 1),
            "caught_up_after_return_s": round(caught_up_at - back, 1),
            "rss_before_mib": {k: round(v) for k, v in before.items()},
            "rss_growth_mib": growth,
            "rss_late_range_mib": late,
            "gaps": sum(counter(t, "bridge_gaps") for t in texts),
            "nav_events": load.sent,
        },
    )
    assert codes == [0, 0, 0]
    assert not verdict.failures(), verdict.summary()
    assert all(t is not None for t in first_503), "a replica said ready all through the outage"
    for i in range(3):
        after = [oks[i] for t, oks in ready if t >= (first_503[i] or 0)]
        assert not any(after), f"replica {i} said ready again during the outage"
    assert all(g < 150 for g in growth.values()), f"RSS grew in the outage: {growth}"
    assert all(r < 40 for r in late.values()), f"RSS still growing late in the outage: {late}"
    assert ready_at - back < BACK_WITHIN_S, f"ready {ready_at - back:.1f}s after the return"
    assert flowing_at - back < BACK_WITHIN_S, f"publishing {flowing_at - back:.1f}s after"
