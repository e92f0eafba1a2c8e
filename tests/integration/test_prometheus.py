"""A real Prometheus (built from the Go module proxy: `make prometheus`) scrapes the bridge
and evaluates the chart's own alert rules: the stale-symbol alert fires within its `for:`
window after a symbol stops and clears once it resumes; every dashboard panel's query
returns data for the symbols running."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from bridge.config import KafkaSettings
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
from tests.tooling import ROOT, built_tool

pytestmark = pytest.mark.integration

CHART_FILES = ROOT / "deploy" / "helm" / "kaiko-bridge" / "files"
LIVE, STOPPED = "vnfa-btca-15-r", "vnfa-etha-10-r"
STALE_AFTER_S = 5  # vinter.stale_after_s: the staleness limit the alert compares with
ALERT_FOR_S = 60  # the rule's `for:`


@contextlib.asynccontextmanager
async def prometheus(tmp_path: Path, target: str) -> AsyncIterator[str]:
    """Prometheus scraping `target` every second with the chart's rules; yields its URL."""
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(CHART_FILES / "alerts.yaml")],
        "scrape_configs": [{"job_name": "bridge", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        built_tool("prometheus"),
        f"--config.file={tmp_path / 'prometheus.yml'}",
        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        stdout=log,
        stderr=asyncio.subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_status(f"{url}/-/ready", 200, timeout=60)
        yield url
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def api(url: str, path: str, **params: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url + path, params=params) as r:
        body = await r.json()
    assert body["status"] == "success", body
    return body["data"]


async def stale_alerts(url: str) -> dict[str, str]:
    """The KaikoBridgeSymbolStale alerts now, by subscription: pending or firing."""
    alerts = (await api(url, "/api/v1/alerts"))["alerts"]
    return {
        a["labels"]["subscription"]: a["state"]
        for a in alerts
        if a["labels"]["alertname"] == "KaikoBridgeSymbolStale"
    }


async def until(check: Any, timeout: float) -> Any:
    """Poll the async `check` every second until it returns something true."""
    async with asyncio.timeout(timeout):
        while True:
            if found := await check():
                return found
            await asyncio.sleep(1.0)  # Prometheus evaluates once a second here


async def load(vinter: VinterSim, symbols: set[str]) -> None:
    """A record of each symbol in `symbols` every 100 ms (the set may change meanwhile)."""
    while True:
        for symbol in sorted(symbols):
            vinter.append(symbol)
        await asyncio.sleep(0.1)  # the upstream's pace


@pytest.mark.timeout(600)
async def test_the_stale_symbol_alert_fires_and_clears_and_every_panel_has_data(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    ops_port = free_port()
    running = {LIVE, STOPPED}
    async with (
        VinterSim([LIVE, STOPPED], token=TOKEN, api_key=API_KEY) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=5) as kaiko,
    ):
        vinter.malformed_every = 50  # dead letters, for their panel
        config = write_config(
            tmp_path, kafka_settings, vinter, kaiko, ops_port, nav=[LIVE, STOPPED], daily=[]
        )
        settings = yaml.safe_load(config.read_text())
        settings["vinter"]["stale_after_s"] = STALE_AFTER_S
        settings["log_level"] = "INFO"
        config.write_text(yaml.safe_dump(settings))
        feeding = asyncio.create_task(load(vinter, running))
        proc = await start_bridge(config)
        try:
            await wait_status(f"http://127.0.0.1:{ops_port}/readyz", 200, timeout=60)
            async with prometheus(tmp_path, f"127.0.0.1:{ops_port}") as url:
                empty = await until_empty(lambda: empty_panels(url), timeout=120)
                assert not empty, f"panels without data: {empty}"
                assert await stale_alerts(url) == {}

                running.discard(STOPPED)  # the upstream stops sending this symbol
                stopped_at = asyncio.get_running_loop().time()
                firing = await until(
                    lambda: firing_for(url, STOPPED), timeout=STALE_AFTER_S + ALERT_FOR_S + 60
                )
                fired_after = asyncio.get_running_loop().time() - stopped_at
                assert LIVE not in firing

                running.add(STOPPED)  # it resumes
                await until(lambda: cleared(url, STOPPED), timeout=60)
        finally:
            feeding.cancel()
            code, output = await stop(proc, config)
    assert code == 0, output[-3000:]
    assert STALE_AFTER_S + ALERT_FOR_S <= fired_after < STALE_AFTER_S + ALERT_FOR_S + 30


async def firing_for(url: str, subscription: str) -> dict[str, str] | None:
    alerts = await stale_alerts(url)
    return alerts if alerts.get(subscription) == "firing" else None


async def cleared(url: str, subscription: str) -> bool:
    return subscription not in await stale_alerts(url)


async def empty_panels(url: str) -> list[str]:
    """The dashboard's panels whose query returns no data (a per-subscription one: not for
    both symbols)."""
    board = json.loads((CHART_FILES / "dashboard.json").read_text())
    empty = []
    for panel in board["panels"]:
        for target in panel["targets"]:
            result = (await api(url, "/api/v1/query", query=target["expr"]))["result"]
            subscriptions = {r["metric"].get("subscription") for r in result}
            per_subscription = "subscription)" in target["expr"]
            if not result or (per_subscription and not {LIVE, STOPPED} <= subscriptions):
                empty.append(panel["title"])
    return empty


async def until_empty(check: Any, timeout: float) -> list[str]:
    """Poll the async `check` every second until it returns an empty list, or the timeout;
    returns its last answer."""
    found: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            while True:
                found = await check()
                if not found:
                    break
                await asyncio.sleep(1.0)  # Prometheus scrapes once a second here
    return found
