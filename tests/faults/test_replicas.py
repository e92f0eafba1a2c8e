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
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bridge.config import KafkaSettings
from bridge.shards import nav_name, shard_of
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import API_KEY, KAIKO_KEY, TOKEN
from tests.faults.checker import against_simulators, settlement_window_start
from tests.faults.harness import BridgeProcess, PacedLoad, new_bridge

pytestmark = pytest.mark.faults

SHARDS = 12
SYMBOLS = int(os.environ.get("REPLICA_TEST_SYMBOLS", "60"))
NAV = [f"rep{i:03d}-r" for i in range(SYMBOLS)]
DAILY = ["vnfa-btca-15-d", "vnfa-etha-10-d", "vnfa-solx-5-d"]
SUBSCRIPTIONS = [
    {"exchange": "cbse", "instrument_class": "spot", "code": "btc-usd"},
    {"exchange": "binc", "instrument_class": "spot", "code": "btc-usdt"},
    {"exchange": "binc", "instrument_class": "spot", "code": "eth-usdt"},
]
RATE = 200.0
SESSION_TIMEOUT_MS = 10_000  # the default
BACKFILL_DAYS = 3


def replica(
    tmp_path: Path, n: int, settings: KafkaSettings, vinter: VinterSim, kaiko: KaikoSim
) -> BridgeProcess:
    """Replica `n`, with its own directory and a stable instance id (a StatefulSet's pod)."""
    home = tmp_path / f"replica-{n}"
    home.mkdir()
    bridge = new_bridge(
        home,
        settings,
        vinter,
        kaiko,
        nav=NAV,
        daily=DAILY,
        settlement={"backfill_days": BACKFILL_DAYS, "interval_s": 2},
    )
    config = yaml.safe_load(bridge.config.read_text())
    config["kaiko"]["subscriptions"] = SUBSCRIPTIONS
    shards = config["shards"]
    shards.update({"count": SHARDS, "instance_id": f"bridge-{n}"})
    shards["group_id"] = f"{settings.topics.control}.group"  # one group for the three
    shards["transactional_id_prefix"] = f"{settings.topics.control}.tx"
    config["log_level"] = "INFO"  # DEBUG from three processes would slow the host down
    bridge.config.write_text(yaml.safe_dump(config))
    return bridge


async def readiness(bridge: BridgeProcess) -> dict[str, Any]:
    """The /readyz body (its `shards` say which this replica holds); {} if it does not answer."""
    try:
        async with aiohttp.ClientSession() as session, session.get(f"{bridge.base}/readyz") as r:
            body: dict[str, Any] = await r.json()
            body["ok"] = r.status == 200
            return body
    except (aiohttp.ClientError, OSError):
        return {}


async def wait_shared(bridges: Iterable[BridgeProcess], timeout: float) -> dict[int, set[int]]:
    """Wait until the given replicas are ready and hold every shard between them, each once;
    returns who holds what."""
    chosen = list(bridges)
    async with asyncio.timeout(timeout):
        while True:
            bodies = [await readiness(b) for b in chosen]
            held = {i: set(body.get("shards", {}).get("held", [])) for i, body in enumerate(bodies)}
            every = [s for shards in held.values() for s in shards]
            if all(b.get("ok") for b in bodies) and sorted(every) == list(range(SHARDS)):
                return held
            await asyncio.sleep(0.25)


def symbols_of(shards: set[int]) -> list[str]:
    return [s for s in NAV if shard_of(nav_name(s), SHARDS) in shards]


async def wait_sockets(vinter: VinterSim, symbols: list[str], timeout: float) -> None:
    """Wait until every one of `symbols` has an open socket."""
    async with asyncio.timeout(timeout):
        for symbol in symbols:
            await vinter.wait_sockets(1, symbol, timeout=timeout)


@pytest.mark.timeout(600)
async def test_three_replicas_share_move_fence_and_roll(
    cluster_settings: KafkaSettings, tmp_path: Path
) -> None:
    settings = cluster_settings
    since = settlement_window_start(datetime.now(UTC), BACKFILL_DAYS)
    async with (
        VinterSim(
            [*NAV, *DAILY], token=TOKEN, api_key=API_KEY, history_days=BACKFILL_DAYS
        ) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=20, resend_on_reconnect=5) as kaiko,
    ):
        bridges = [replica(tmp_path, n, settings, vinter, kaiko) for n in range(3)]
        try:
            for bridge in bridges:
                await bridge.start()
            held = await wait_shared(bridges, timeout=180)
            assert all(held.values()), f"a replica holds no shard: {held}"
            load = PacedLoad(vinter, NAV, RATE)
            loading = asyncio.create_task(load.send(10**9))

            # 1. SIGKILL replica 0: its shards move to the other two.
            await load.reached(int(RATE * 5), timeout=60)
            moved = symbols_of(held[0])
            killed_at = time.monotonic()
            await bridges[0].kill()
            after_kill = await wait_shared(bridges[1:], timeout=90)
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
                await wait_shared([bridges[2]], timeout=SESSION_TIMEOUT_MS / 1000 + 60)
            finally:
                stopped.proc.send_signal(signal.SIGCONT)
            await bridges[0].start()
            await wait_shared(bridges, timeout=120)

            # 3. A rolling restart, one replica at a time.
            for bridge in bridges:
                assert await bridge.terminate() == 0, bridge.output()[-3000:]
                await bridge.start()
                await wait_shared(bridges, timeout=120)
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
