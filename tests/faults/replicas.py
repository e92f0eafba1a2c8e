"""Bridge replicas as processes in one group: their configuration, what they say they hold,
and waits on the group as a whole (the replica and soak scenarios share them)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bridge.config import KafkaSettings
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import API_KEY, KAIKO_KEY, TOKEN
from tests.faults.harness import BridgeProcess, new_bridge

SUBSCRIPTIONS = [
    {"exchange": "cbse", "instrument_class": "spot", "code": "btc-usd"},
    {"exchange": "binc", "instrument_class": "spot", "code": "btc-usdt"},
    {"exchange": "binc", "instrument_class": "spot", "code": "eth-usdt"},
]


def replica(
    home: Path,
    n: int,
    settings: KafkaSettings,
    vinter: VinterSim,
    kaiko: KaikoSim,
    *,
    nav: list[str],
    daily: list[str],
    shards: int,
    settlement: Mapping[str, Any],
    kafka: Mapping[str, Any] | None = None,
) -> BridgeProcess:
    """Replica `n` under `home`, with its own directory and a stable instance id (a
    StatefulSet's pod), in the group every replica of `settings` joins."""
    home = home / f"replica-{n}"
    home.mkdir()
    bridge = new_bridge(
        home, settings, vinter, kaiko, nav=nav, daily=daily, settlement=settlement, kafka=kafka
    )
    config = yaml.safe_load(bridge.config.read_text())
    config["kaiko"]["subscriptions"] = SUBSCRIPTIONS
    config["shards"].update(
        {
            "count": shards,
            "instance_id": f"bridge-{n}",
            "group_id": f"{settings.topics.control}.group",
            "transactional_id_prefix": f"{settings.topics.control}.tx",
        }
    )
    config["log_level"] = "INFO"  # DEBUG from three processes would slow the host down
    bridge.config.write_text(yaml.safe_dump(config))
    return bridge


def group(
    home: Path, settings: KafkaSettings, vinter: VinterSim, kaiko: KaikoSim, **config: Any
) -> list[BridgeProcess]:
    """Three replicas of one group (`config`: as `replica` takes it)."""
    return [replica(home, n, settings, vinter, kaiko, **config) for n in range(3)]


@asynccontextmanager
async def simulators(
    symbols: Sequence[str], history_days: int, *, kaiko_rate: float, resend: int = 0
) -> AsyncIterator[tuple[VinterSim, KaikoSim]]:
    """Vinter with `symbols` (and `history_days` of history) and Kaiko at `kaiko_rate`
    intervals a second, resending the last `resend` on a reconnect."""
    async with (
        VinterSim(symbols, token=TOKEN, api_key=API_KEY, history_days=history_days) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=kaiko_rate, resend_on_reconnect=resend) as kaiko,
    ):
        yield vinter, kaiko


async def readiness(bridge: BridgeProcess) -> dict[str, Any]:
    """The /readyz body (its `shards` say which this replica holds); {} if it does not answer."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.get(f"{bridge.base}/readyz") as r,
        ):
            body: dict[str, Any] = await r.json()
            body["ok"] = r.status == 200
            return body
    except (aiohttp.ClientError, OSError, TimeoutError):
        return {}


async def wait_shared(
    bridges: Iterable[BridgeProcess], shards: int, timeout: float
) -> dict[int, set[int]]:
    """Wait until the given replicas are ready and hold all `shards` between them, each once;
    returns who holds what (by position in `bridges`)."""
    chosen = list(bridges)
    async with asyncio.timeout(timeout):
        while True:
            bodies = [await readiness(b) for b in chosen]
            held = {i: set(body.get("shards", {}).get("held", [])) for i, body in enumerate(bodies)}
            every = [s for taken in held.values() for s in taken]
            if all(b.get("ok") for b in bodies) and sorted(every) == list(range(shards)):
                return held
            await asyncio.sleep(0.25)


async def wait_sockets(vinter: VinterSim, symbols: Sequence[str], timeout: float) -> None:
    """Wait until every one of `symbols` has an open socket."""
    async with asyncio.timeout(timeout):
        for symbol in symbols:
            await vinter.wait_sockets(1, symbol, timeout=timeout)
