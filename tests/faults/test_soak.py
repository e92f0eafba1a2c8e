"""The soak: every fault at once, across three replicas, on the 3-node cluster (RF 3,
`min.insync.replicas=2`), under a steady NAV load with VWAP and settlements.

`make soak` runs the issue's scale (`SOAK_SCALE=full`: 100,000 NAV events, 5 leader bounces,
5 broker pauses, 3 replica kills, 2 replica stops, 3 upstream drops, 20 kills of the
settlement holder); CI runs the same scenario at `SOAK_SCALE=ci`. Afterwards the checker
compares what the simulators sent with Kafka, read_committed: nothing lost, no id twice,
order kept per key, settlements exactly once per revision. Figures are printed (`-s`) and,
with `SOAK_REPORT=path`, appended there as JSON lines for docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.config import KafkaSettings
from bridgedev.localkafka import LocalKafkaCluster
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.faults.checker import Verdict, against_simulators, settlement_window_start
from tests.faults.harness import BridgeProcess, PacedLoad, counter, partition_of, secret_hits
from tests.faults.replicas import group, simulators, wait_shared
from tests.faults.soak import (
    LONG_PAUSE_S,
    SHORT_PAUSE_S,
    TWO_BROKERS_S,
    Fault,
    Memory,
    NavTail,
    bounce,
    drop_upstreams,
    emitted_ids,
    kill_bridge,
    pause,
    pause_leader,
    run_fault,
    scale,
    stop_bridge,
)

SCALE = scale()
SHARDS = 12
NAV = [f"soak{i:02d}-r" for i in range(30)]
DAILY = ["vnfa-btca-15-d", "vnfa-etha-10-d", "vnfa-solx-5-d"]
RATE = 500.0
BACKFILL_DAYS = 3
TRANSACTION_TIMEOUT_MS = 60_000
CONFIG: dict[str, Any] = {  # each replica's, as `replica` takes it
    "nav": NAV,
    "daily": DAILY,
    "shards": SHARDS,
    "settlement": {"backfill_days": BACKFILL_DAYS, "interval_s": 1, "window_interval_s": 1},
    # shorter than the 2-broker pause: the brokers abort the shards' open transactions,
    # and each replica must start its shards again without a rebalance
    "kafka": {"transaction_timeout_ms": TRANSACTION_TIMEOUT_MS},
}
RECOVERY_TIMEOUT_S = 240.0

Step = Callable[[], Awaitable[tuple[str, float]]]


def report(name: str, figures: dict[str, Any]) -> None:
    """Print the figures, and append them to `SOAK_REPORT` when it is set."""
    line = orjson.dumps({"scenario": name, "scale": SCALE.name, **figures}).decode()
    print(line)
    path = os.environ.get("SOAK_REPORT")
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with Path(path).open("a") as out:
            out.write(line + "\n")


def schedule(
    rng: random.Random,
    *,
    cluster: LocalKafkaCluster,
    settings: KafkaSettings,
    bridges: list[BridgeProcess],
    vinter: VinterSim,
    kaiko: KaikoSim,
) -> list[tuple[str, Step]]:
    """The faults of this scale in a shuffled order (the seed is printed)."""
    topic = settings.topics.nav_ticks
    partition = partition_of(settings, NAV[0])

    def leader_pause(seconds: float) -> Step:
        return lambda: pause_leader(cluster, topic, rng.randrange(settings.partitions), seconds)

    steps: list[tuple[str, Step]] = []
    steps += [("leader bounce", lambda: bounce(cluster, topic, partition))] * SCALE.bounces
    steps += [("leader pause", leader_pause(SHORT_PAUSE_S))] * SCALE.short_pauses
    steps.append(("leader pause past the request timeout", leader_pause(LONG_PAUSE_S)))
    steps.append(
        (
            "2 of 3 brokers paused",
            lambda: pause(rng.sample(cluster.nodes, 2), TWO_BROKERS_S),
        )
    )
    steps += [("replica SIGKILL", lambda: kill_bridge(rng.choice(bridges)))] * SCALE.bridge_kills
    steps += [("replica SIGSTOP", lambda: stop_bridge(rng.choice(bridges)))] * SCALE.bridge_stops
    steps += [("upstream drops", lambda: drop_upstreams(vinter, kaiko))] * SCALE.upstream_drops
    rng.shuffle(steps)
    only = os.environ.get("SOAK_ONLY")  # a kind of fault alone, to look into one
    return [(kind, step) for kind, step in steps if not only or only in kind]


async def corrections(vinter: VinterSim, every_s: float) -> None:
    """A new revision of yesterday's close of each daily symbol every `every_s`."""
    n = 0
    while True:
        await asyncio.sleep(every_s)  # the upstream's pace
        n += 1
        for symbol in DAILY:
            yesterday = str(vinter.history(symbol)[-1]["date"])
            vinter.correct(symbol, yesterday, close=1000.0 + n)


@pytest.mark.timeout(3600)
async def test_every_fault_at_once_across_three_replicas(
    cluster: LocalKafkaCluster, cluster_settings: KafkaSettings, tmp_path: Path
) -> None:
    settings = cluster_settings
    seed = int(os.environ.get("SOAK_SEED") or random.randrange(1 << 30))
    print(f"SOAK_SEED={seed}")  # rerun a failing order with it
    rng = random.Random(seed)
    since = settlement_window_start(datetime.now(UTC), BACKFILL_DAYS)
    t = settings.topics
    kafka_topics = [t.nav_ticks, t.vwap_ticks, t.settlements, t.dlq, t.state]
    async with simulators([*NAV, *DAILY], BACKFILL_DAYS, kaiko_rate=20, resend=5) as sims:
        vinter, kaiko = sims
        vinter.invalid_every = 150  # a few dead letters along the way (per socket)
        bridges = group(tmp_path, settings, vinter, kaiko, **CONFIG)
        tail = NavTail(settings.bootstrap_servers, settings.topics.nav_ticks)
        memory = Memory(bridges)
        load = PacedLoad(vinter, NAV, RATE)
        faults: list[Fault] = []
        try:
            for bridge in bridges:
                await bridge.start()
            await wait_shared(bridges, SHARDS, timeout=180)
            async with asyncio.TaskGroup() as background:
                tasks = [
                    background.create_task(load.send(10**9)),
                    background.create_task(tail.follow()),
                    background.create_task(memory.run()),
                    background.create_task(corrections(vinter, 5.0)),
                ]
                began = time.monotonic()
                for kind, step in schedule(
                    rng,
                    cluster=cluster,
                    settings=settings,
                    bridges=bridges,
                    vinter=vinter,
                    kaiko=kaiko,
                ):
                    faults.append(await run_fault(kind, step, began, cluster, kafka_topics))
                    await wait_shared(bridges, SHARDS, timeout=RECOVERY_TIMEOUT_S)
                    whole = await tail.caught_up(
                        lambda: emitted_ids(vinter, NAV), timeout=RECOVERY_TIMEOUT_S
                    )
                    faults[-1].finish(whole, tail)
                    print(faults[-1].figures())
                    await asyncio.sleep(SCALE.dwell_s)  # steady load between the faults
                await load.reached(SCALE.events, timeout=SCALE.events / RATE + 120)
                for task in tasks:
                    task.cancel()
            vinter.invalid_every = None
            kaiko.stall()
            compare = against_simulators(
                settings, vinter, kaiko, nav=NAV, daily=DAILY, since_ms=since
            )
            verdict = await compare(timeout=300)
            texts = {b.config.parent.name: await b.metrics() for b in bridges}
        finally:
            codes = [await b.terminate() for b in bridges]
    outputs = {b.config.parent.name: b.output() for b in bridges}
    retakes = sum(o.count("starting it again") for o in outputs.values())
    summarize(faults, verdict, memory, load, texts, retakes=retakes)
    assert codes == [0, 0, 0], "\n".join(o[-2000:] for o in outputs.values())
    assert not verdict.failures(), verdict.summary()
    assert verdict.complete, verdict.summary()
    nav, vwap, settlements = verdict.checks
    assert nav.found >= SCALE.events
    assert vwap.found > 0
    assert settlements.found > 0
    assert len(verdict.records[settings.topics.dlq]) > 0  # the invalid records, dead-lettered
    assert sum(counter(t, "bridge_events_failed") for t in texts.values()) == 0
    hits = secret_hits({**verdict.raw(), **outputs, **texts})
    assert not hits, f"secrets leaked: {hits}"
    everything = "\n".join(outputs.values())
    for careless in ("was never retrieved", "Task was destroyed but it is pending"):
        at = everything.find(careless)
        assert at < 0, everything[max(0, at - 1500) : at + 2500]


def summarize(
    faults: list[Fault],
    verdict: Verdict,
    memory: Memory,
    load: PacedLoad,
    texts: dict[str, str],
    *,
    retakes: int,
) -> None:
    print(verdict.summary())
    kinds: dict[str, int] = {}
    for fault in faults:
        kinds[fault.kind] = kinds.get(fault.kind, 0) + 1
    _, vwap, settlements = verdict.checks
    report(
        "every fault at once",
        {
            "nav_events": load.sent,
            "load_s": round(load.seconds, 1),
            "faults": kinds,
            "lost": sum(len(c.lost) for c in verdict.checks),
            "duplicates": sum(len(c.duplicates) for c in verdict.checks),
            "out_of_order": sum(len(c.out_of_order) for c in verdict.checks),
            "vwap_covered_by_gaps": vwap.covered_by_gaps,
            "gaps": vwap.gaps,
            "settlements": settlements.found,
            "worst_recovery_s": round(max((f.recovered_s for f in faults), default=0.0), 1),
            "slowest_fault": max(faults, key=lambda f: f.recovered_s).kind if faults else None,
            "events_per_s_during_faults": {
                kind: round(min(f.events_per_s for f in faults if f.kind == kind)) for kind in kinds
            },
            "peak_rss_mib": {k: round(v) for k, v in sorted(memory.peaks.items())},
            "producer_restarts": sum(
                counter(t, "bridge_producer_restarts") for t in texts.values()
            ),
            "fenced_commits": sum(counter(t, "bridge_fenced_commits") for t in texts.values()),
            "shards_started_again_after_a_fence": retakes,
            "per_fault": [f.figures() for f in faults],
        },
    )
