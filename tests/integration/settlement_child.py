"""A settlement poller in its own process, for the crash test (killed with SIGKILL).

    SETTLEMENT_CHILD='{"rest_url": ..., "api_key": ..., "bootstrap": ..., "topics": {...},
                       "symbols": [...], "transactional_id": ..., "mode": "forever"}' \
        python tests/integration/settlement_child.py

`forever`: runs the poller under `keep_running` (polling every 50 ms) and prints `ready`
once it is started. `once`: one poll, prints its report as JSON, exits 0.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sys
from typing import Any

import orjson
from pydantic import SecretStr

from bridge.backoff import Backoff
from bridge.config import KafkaSettings, SettlementSettings, Topics
from bridge.sources.settlement import SettlementPoller
from bridge.sources.vinter_rest import VinterRest
from bridge.supervisor import Progress, keep_running


class Announced:
    """The poller, saying `ready` on stdout each time a session is up."""

    def __init__(self, poller: SettlementPoller) -> None:
        self.poller = poller
        self.name = poller.name

    async def session(self, progress: Progress) -> None:
        inner = progress.on_connect

        def ready() -> None:
            if inner is not None:
                inner()
            sys.stdout.write("ready\n")
            sys.stdout.flush()

        progress.on_connect = ready
        await self.poller.session(progress)


async def main(config: dict[str, Any]) -> None:
    kafka = KafkaSettings(
        bootstrap_servers=config["bootstrap"], linger_ms=2, topics=Topics(**config["topics"])
    )
    settlement = SettlementSettings(
        symbols=config["symbols"],
        transactional_id=config["transactional_id"],
        backfill_days=config.get("backfill_days", 30),
        interval_s=0.05,
        window_interval_s=0.05,
    )
    rest = VinterRest(
        config["rest_url"], SecretStr(config["api_key"]), backoff=Backoff(initial=0.05, cap=0.2)
    )
    async with rest:
        poller = SettlementPoller(settlement, kafka, rest)
        if config.get("mode") == "once":
            async with poller:
                report = await poller.poll()
            sys.stdout.write(orjson.dumps(dataclasses.asdict(report)).decode() + "\n")
            return
        await keep_running(Announced(poller), backoff=Backoff(initial=0.05, cap=0.5))


if __name__ == "__main__":
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s"
    )
    asyncio.run(main(orjson.loads(os.environ["SETTLEMENT_CHILD"])))
