"""`kaiko-bridge run` as a real process: readiness, metrics, secrets, SIGTERM, SIGKILL."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import KafkaSettings
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import (
    API_KEY,
    DAILY,
    KAIKO_KEY,
    NAV,
    TOKEN,
    free_port,
    get,
    start_bridge,
    stop,
    wait_status,
    write_config,
)
from tests.kafkautil import read_topic, values, wait_for

pytestmark = pytest.mark.integration


async def test_run_ready_metrics_and_sigterm(kafka_settings: KafkaSettings, tmp_path: Path) -> None:
    ops_port = free_port()
    async with (
        VinterSim([*NAV, *DAILY], token=TOKEN, api_key=API_KEY, rate=20, history_days=5) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=20) as kaiko,
    ):
        config = write_config(
            tmp_path, kafka_settings, vinter, kaiko, ops_port, nav=NAV, daily=DAILY
        )
        proc = await start_bridge(config)
        try:
            base = f"http://127.0.0.1:{ops_port}"
            await wait_status(f"{base}/healthz", 200, timeout=60)
            await wait_status(f"{base}/readyz", 200, timeout=60)
            status, text = await get(f"{base}/metrics")
            assert status == 200
            families = {f.name: f for f in text_string_to_metric_families(text)}
            assert "bridge_events_published" in families
            assert not any(s in text for s in (TOKEN, API_KEY, KAIKO_KEY))
            for topic in (
                kafka_settings.topics.nav_ticks,
                kafka_settings.topics.vwap_ticks,
                kafka_settings.topics.settlements,
            ):
                await read_topic(kafka_settings.bootstrap_servers, topic, until=1, timeout=60)
            rows = await fresh_rows(base, timeout=60)
        finally:
            code, output = await stop(proc, config)
    assert code == 0, output[-3000:]
    assert "stopped cleanly" in output
    for secret in (TOKEN, API_KEY, KAIKO_KEY):
        assert secret not in output  # DEBUG logging on, websockets and grpc included
    settled = values(
        await read_topic(
            kafka_settings.bootstrap_servers,
            kafka_settings.topics.settlements,
            until=5,
            timeout=30,
        )
    )
    assert {s["data"]["symbol"] for s in settled} == set(DAILY)
    # freshness: a row per configured subscription, each held here and published recently
    assert {k for k in rows if k[0] != "vwap"} == {
        *(("nav", s) for s in NAV),
        *(("settlement", s) for s in DAILY),
    }
    assert [k for k in rows if k[0] == "vwap"] == [("vwap", "cbse:spot:btc-usd:1s")]
    for key, row in rows.items():
        assert row["state"] in ("connected", "backfilling"), (key, row)
        assert row["stale_after_seconds"] > 0, key
        assert 0 <= row["upstream_lag_seconds"] < 10 * 86400, (key, row)


async def fresh_rows(base: str, timeout: float) -> dict[tuple[str, str], dict[str, Any]]:
    """The freshness rows of /metrics by (feed, subscription), once every one of them has
    published something."""
    async with asyncio.timeout(timeout):
        while True:
            _, text = await get(f"{base}/metrics")
            rows: dict[tuple[str, str], dict[str, Any]] = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if not sample.name.startswith("bridge_subscription_"):
                        continue
                    row = rows.setdefault(
                        (sample.labels["feed"], sample.labels["subscription"]), {}
                    )
                    field = sample.name.removeprefix("bridge_subscription_")
                    if field == "state":
                        if sample.value == 1:
                            row["state"] = sample.labels["state"]
                    else:
                        row[field] = sample.value
            if rows and all("last_published_timestamp_seconds" in r for r in rows.values()):
                return rows
            await asyncio.sleep(0.5)  # polling another process's /metrics


async def test_sigkill_and_restart_loses_and_repeats_nothing(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """SIGKILL the bridge mid-stream, let the upstreams go on, restart it: every NAV record
    from the first one published to the last one emitted is in Kafka exactly once (marks
    recovered from Kafka, the outage back-filled over REST), and no VWAP interval twice."""
    bootstrap, topics = kafka_settings.bootstrap_servers, kafka_settings.topics
    symbol = NAV[0]
    async with (
        VinterSim([symbol], token=TOKEN, api_key=API_KEY, rate=40) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=40, resend_on_reconnect=5) as kaiko,
    ):
        config = write_config(
            tmp_path, kafka_settings, vinter, kaiko, free_port(), nav=[symbol], daily=[]
        )
        proc = await start_bridge(config)
        await read_topic(bootstrap, topics.nav_ticks, until=100, timeout=60)
        await read_topic(bootstrap, topics.vwap_ticks, until=100, timeout=60)
        code, _ = await stop(proc, config, signal.SIGKILL)
        assert code == -signal.SIGKILL
        emitted = len(vinter.history(symbol))
        await wait_for(lambda: len(vinter.history(symbol)) >= emitted + 80, timeout=30)

        proc = await start_bridge(config)
        try:
            await wait_for(lambda: len(vinter.history(symbol)) >= emitted + 200, timeout=30)
            # VWAP resumed: the restarted bridge's first interval comes after a gap event (a
            # stall before then, and there would be no interval, and no gap, to publish)
            await read_topic(
                bootstrap,
                topics.vwap_ticks,
                until=lambda rs: any(b"bridge.gap" in (r.value or b"") for r in rs),
                timeout=60,
            )
            vinter.rate = 0  # upstreams go quiet; everything they sent must now be in Kafka
            kaiko.stall()
            last = vinter.history(symbol)[-1]["timestamp"]
            nav = values(
                await read_topic(
                    bootstrap,
                    topics.nav_ticks,
                    until=lambda rs: any(f":{last}".encode() in (r.value or b"") for r in rs),
                    timeout=60,
                    idle=1.0,
                )
            )
            vwap = values(await read_topic(bootstrap, topics.vwap_ticks, idle=1.0, timeout=60))
        finally:
            code, output = await stop(proc, config)
    assert code == 0, output[-3000:]
    ids = [e["id"] for e in nav]
    assert len(ids) == len(set(ids)), "a NAV record was published twice"
    published = sorted(e["data"]["timestamp"] for e in nav)
    expected = [
        r["timestamp"] for r in vinter.history(symbol) if published[0] <= r["timestamp"] <= last
    ]
    assert published == expected, "a NAV record is missing"
    ticks = [e["id"] for e in vwap if e["type"] == "kaiko.vwap.tick"]
    assert len(ticks) == len(set(ticks)), "a VWAP interval was published twice"
    assert any(e["type"] == "bridge.gap" for e in vwap)
