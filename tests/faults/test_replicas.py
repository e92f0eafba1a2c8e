"""Three replicas share the subscriptions through the group: each subscription is held by one
process at a time; a SIGKILLed replica's shards move to the others; a replica SIGSTOPped past
the session timeout is fenced when it wakes and rejoins; then a rolling restart of all three.
Kafka, read with read_committed, ends with every NAV record once, no VWAP interval twice and
every settlement revision once.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from bridge.config import KafkaSettings
from bridge.shards import nav_name, shard_of
from tests.faults.checker import against_simulators, settlement_window_start
from tests.faults.harness import PacedLoad
from tests.faults.replicas import group, simulators, wait_shared, wait_sockets

pytestmark = pytest.mark.faults

SHARDS = 12
SYMBOLS = int(os.environ.get("REPLICA_TEST_SYMBOLS", "60"))
NAV = [f"rep{i:03d}-r" for i in range(SYMBOLS)]
DAILY = ["vnfa-btca-15-d", "vnfa-etha-10-d", "vnfa-solx-5-d"]
RATE = 200.0
SESSION_TIMEOUT_MS = 10_000  # the default
BACKFILL_DAYS = 3
CONFIG: dict[str, Any] = {  # each replica's, as `replica` takes it
    "nav": NAV,
    "daily": DAILY,
    "shards": SHARDS,
    "settlement": {"backfill_days": BACKFILL_DAYS, "interval_s": 2},
}


def symbols_of(shards: set[int]) -> list[str]:
    return [s for s in NAV if shard_of(nav_name(s), SHARDS) in shards]


@pytest.mark.timeout(600)
async def test_three_replicas_share_move_fence_and_roll(
    cluster_settings: KafkaSettings, tmp_path: Path
) -> None:
    settings = cluster_settings
    since = settlement_window_start(datetime.now(UTC), BACKFILL_DAYS)
    async with simulators([*NAV, *DAILY], BACKFILL_DAYS, kaiko_rate=20, resend=5) as sims:
        vinter, kaiko = sims
        bridges = group(tmp_path, settings, vinter, kaiko, **CONFIG)
        try:
            for bridge in bridges:
                await bridge.start()
            held = await wait_shared(bridges, SHARDS, timeout=180)
            assert all(held.values()), f"a replica holds no shard: {held}"
            load = PacedLoad(vinter, NAV, RATE)
            loading = asyncio.create_task(load.send(10**9))

            # 1. SIGKILL replica 0: its shards move to the other two.
            await load.reached(int(RATE * 5), timeout=60)
            moved = symbols_of(held[0])
            killed_at = time.monotonic()
            await bridges[0].kill()
            after_kill = await wait_shared(bridges[1:], SHARDS, timeout=90)
            await wait_sockets(vinter, moved, timeout=30)
            reconnect_s = time.monotonic() - killed_at
            assert set().union(*after_kill.values()) == set(range(SHARDS))
            peaks_before_stop = dict(vinter.peak_sockets)
            kaiko_peaks = dict(kaiko.peak_by_subscription)

            # 2. SIGSTOP replica 1 past the session timeout; SIGCONT: it is fenced, rejoins.
            stopped = bridges[1]
            assert stopped.proc is not None
            stopped.proc.send_signal(signal.SIGSTOP)
            try:
                await wait_shared([bridges[2]], SHARDS, timeout=SESSION_TIMEOUT_MS / 1000 + 60)
            finally:
                stopped.proc.send_signal(signal.SIGCONT)
            await bridges[0].start()
            await wait_shared(bridges, SHARDS, timeout=120)

            # 3. A rolling restart, one replica at a time.
            for bridge in bridges:
                assert await bridge.terminate() == 0, bridge.output()[-3000:]
                await bridge.start()
                await wait_shared(bridges, SHARDS, timeout=120)
            await load.reached(load.sent + int(RATE * 3), timeout=60)
            loading.cancel()
            kaiko.stall()
            compare = against_simulators(
                settings, vinter, kaiko, nav=NAV, daily=DAILY, since_ms=since
            )
            verdict = await compare(timeout=120)
        finally:
            codes = [await b.terminate() for b in bridges]
    print(
        f"SIGKILL: {len(moved)} NAV symbols moved; all held again {reconnect_s:.1f}s after "
        f"the kill (session timeout {SESSION_TIMEOUT_MS / 1000:.0f}s)"
    )
    print(verdict.summary())
    outputs = "\n".join(b.output() for b in bridges)
    assert codes == [0, 0, 0], outputs[-3000:]
    for careless in ("was never retrieved", "Task was destroyed but it is pending"):
        assert careless not in outputs, outputs[outputs.index(careless) - 2000 :][:4000]
    assert max(peaks_before_stop.values()) == 1, peaks_before_stop  # never two holders
    assert max(kaiko_peaks.values()) == 1, kaiko_peaks
    assert "fenced" in bridges[1].output(), "the SIGSTOPped replica was never fenced"
    assert not verdict.failures(), verdict.summary()
    assert reconnect_s < 15 + 10  # target 15 s; bounded loosely on a loaded 2-core host
