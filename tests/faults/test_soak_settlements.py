"""The soak's settlements: the replica holding the settlement symbols SIGKILLed again and
again (20 times at `make soak`'s scale) while upstream corrections keep coming.

How the test knows a kill landed inside a transaction: every settlement symbol is in one
shard, so one transactional producer writes the settlements topic. The test watches that
topic read_uncommitted; when a new record shows, it SIGSTOPs the holder and compares the
topic's last stable offset (what read_committed may see) with its high watermark. Still
apart half a second later, a transaction holding settlements is open in a frozen process:
the SIGKILL lands inside it (otherwise it resumes the process and waits for the next record,
a few times, then kills anyway). Afterwards each (symbol, date) has revisions 1..n exactly
once, read_committed, and the aborted records are there for read_uncommitted to see.
"""

from __future__ import annotations

import asyncio
import random
import signal
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.aiokafka_internals import client_of, partitions_now
from bridge.config import KafkaSettings
from bridge.shards import settlement_name, shard_of
from bridgedev.localkafka import LocalKafkaCluster
from bridgedev.sim.vinter import VinterSim
from tests.faults.checker import against_simulators, settlement_window_start
from tests.faults.harness import BridgeProcess
from tests.faults.replicas import group, readiness, simulators, wait_shared
from tests.faults.soak import scale
from tests.faults.test_soak import report

SCALE = scale()
SHARDS = 12
NAV = ["vnfa-btca-15-r"]
BACKFILL_DAYS = 3
TRIES = 10  # records watched per kill before killing wherever the holder is
OPEN_FOR_S = 0.5  # an open transaction must still be open this much later


def in_one_shard(count: int) -> tuple[int, list[str]]:
    """`count` daily symbols whose settlements all fall into one shard, and that shard."""
    by_shard: dict[int, list[str]] = {}
    for i in range(1000):
        name = f"vnfa-k{i:03d}-d"
        chosen = by_shard.setdefault(shard_of(settlement_name(name), SHARDS), [])
        chosen.append(name)
        if len(chosen) == count:
            return shard_of(settlement_name(name), SHARDS), chosen
    raise AssertionError("no shard got enough symbols")


SHARD, DAILY = in_one_shard(3)
CONFIG: dict[str, Any] = {  # each replica's, as `replica` takes it
    "nav": NAV,
    "daily": DAILY,
    "shards": SHARDS,
    "settlement": {"backfill_days": BACKFILL_DAYS, "interval_s": 0.2, "window_interval_s": 0.2},
}


@dataclass
class Kill:
    inside: bool  # the holder was frozen inside an open transaction holding settlements
    tries: int


class Watch:
    """The settlements topic as read_uncommitted and read_committed readers see it."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.uncommitted = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=5
        )
        self.committed = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
        )
        self.tps: list[TopicPartition] = []

    async def start(self) -> None:
        await self.uncommitted.start()
        await self.committed.start()
        parts = await partitions_now(client_of(self.uncommitted), self.topic)
        self.tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
        self.uncommitted.assign(self.tps)
        await self.uncommitted.seek_to_end(*self.tps)

    async def stop(self) -> None:
        await self.uncommitted.stop()
        await self.committed.stop()

    async def next_record(self, timeout: float) -> None:
        """Wait for a record written after the last one seen (committed or not)."""
        async with asyncio.timeout(timeout):
            while not any((await self.uncommitted.getmany(timeout_ms=1000)).values()):
                pass

    async def open_transaction(self) -> bool:
        """Whether some partition's last stable offset is below its high watermark."""
        stable = await self.committed.end_offsets(self.tps)
        high = await self.uncommitted.end_offsets(self.tps)
        return any(stable[tp] < high[tp] for tp in self.tps)

    async def aborted(self) -> int:
        """Records read_uncommitted sees that read_committed never will (the transactions
        of killed holders, aborted by their successors)."""
        seen: dict[str, set[tuple[int, int]]] = {}
        for name, consumer in (("all", self.uncommitted), ("committed", self.committed)):
            consumer.assign(self.tps)
            await consumer.seek_to_beginning(*self.tps)
            ends = await consumer.end_offsets(self.tps)
            found: set[tuple[int, int]] = set()
            async with asyncio.timeout(60):
                while any([await consumer.position(tp) < ends[tp] for tp in self.tps]):
                    for records in (await consumer.getmany(timeout_ms=500)).values():
                        found |= {(r.partition, r.offset) for r in records}
            seen[name] = found
        return len(seen["all"] - seen["committed"])


async def holder(bridges: list[BridgeProcess]) -> BridgeProcess:
    """The replica that holds the settlement shard now."""
    for bridge in bridges:
        if SHARD in (await readiness(bridge)).get("shards", {}).get("held", []):
            return bridge
    raise AssertionError(f"nobody holds shard {SHARD}")


async def corrections(vinter: VinterSim, rng: random.Random) -> None:
    """Upstream corrections of recent closes, several a second."""
    n = 0
    while True:
        await asyncio.sleep(rng.uniform(0.05, 0.3))  # the upstream's pace
        n += 1
        symbol = rng.choice(DAILY)
        record = rng.choice(vinter.history(symbol)[-BACKFILL_DAYS:])
        vinter.correct(symbol, str(record["date"]), close=2000.0 + n)


async def freeze_inside_a_transaction(bridge: BridgeProcess, watch: Watch) -> Kill:
    """SIGSTOP `bridge` right after a settlement record shows; keep it frozen if its
    transaction is still open a moment later, else let it go and try the next record."""
    assert bridge.proc is not None
    for tries in range(1, TRIES + 1):
        await watch.next_record(timeout=60)
        bridge.proc.send_signal(signal.SIGSTOP)
        if await watch.open_transaction():
            await asyncio.sleep(OPEN_FOR_S)  # frozen: the commit cannot be on its way
            if await watch.open_transaction():
                return Kill(inside=True, tries=tries)
        if tries < TRIES:
            bridge.proc.send_signal(signal.SIGCONT)
    return Kill(inside=False, tries=TRIES)


@pytest.mark.timeout(2400)
async def test_settlement_holder_killed_again_and_again(
    cluster: LocalKafkaCluster, cluster_settings: KafkaSettings, tmp_path: Path
) -> None:
    settings = cluster_settings
    rng = random.Random(SHARD)
    since = settlement_window_start(datetime.now(UTC), BACKFILL_DAYS)
    async with simulators([*NAV, *DAILY], BACKFILL_DAYS, kaiko_rate=5) as sims:
        vinter, kaiko = sims
        bridges = group(tmp_path, settings, vinter, kaiko, **CONFIG)
        watch = Watch(settings.bootstrap_servers, settings.topics.settlements)
        kills: list[Kill] = []
        try:
            for bridge in bridges:
                await bridge.start()
            await wait_shared(bridges, SHARDS, timeout=180)
            await watch.start()
            correcting = asyncio.create_task(corrections(vinter, rng))
            for _ in range(SCALE.settlement_kills):
                target = await holder(bridges)
                kills.append(await freeze_inside_a_transaction(target, watch))
                await target.kill()  # SIGKILL ends a stopped process too
                await target.start()
                await wait_shared(bridges, SHARDS, timeout=120)
            correcting.cancel()
            kaiko.stall()
            compare = against_simulators(
                settings, vinter, kaiko, nav=NAV, daily=DAILY, since_ms=since
            )
            verdict = await compare(timeout=180)
            aborted = await watch.aborted()
        finally:
            await watch.stop()
            codes = [await b.terminate() for b in bridges]
    inside = sum(k.inside for k in kills)
    settlements = verdict.checks[2]
    print(verdict.summary())
    report(
        "settlement holder killed",
        {
            "kills": len(kills),
            "inside_a_transaction": inside,
            "tries": [k.tries for k in kills],
            "aborted_settlement_records": aborted,
            "settlements": settlements.found,
            "expected_dates": settlements.expected,
        },
    )
    assert codes == [0, 0, 0]
    assert len(kills) == SCALE.settlement_kills
    assert not verdict.failures(), verdict.summary()
    assert settlements.found > settlements.expected  # corrections became revisions
    assert inside >= 1, "no kill landed inside a transaction"
    assert aborted >= inside  # each such kill left its transaction's records aborted
