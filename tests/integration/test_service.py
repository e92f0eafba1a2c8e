"""`kaiko-bridge run` as a real process: readiness, metrics, secrets, SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import KafkaSettings
from bridge.sim.kaiko import KaikoSim
from bridge.sim.vinter import VinterSim
from tests.kafkautil import read_topic, values, wait_for

pytestmark = pytest.mark.integration

TOKEN = "ws-token-SENTINEL-1f2e"
API_KEY = "rest-key-SENTINEL-3d4c"
KAIKO_KEY = "kaiko-key-SENTINEL-5b6a"
NAV = ["vnfa-btca-15-r", "vnfa-etha-10-h"]
DAILY = ["vnfa-btca-15-d"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


async def wait_status(url: str, status: int, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                if (await get(url))[0] == status:
                    return
            await asyncio.sleep(0.2)


def write_config(
    tmp_path: Path,
    kafka_settings: KafkaSettings,
    vinter: VinterSim,
    kaiko: KaikoSim,
    ops_port: int,
    *,
    nav: list[str],
    daily: list[str],
) -> Path:
    kaiko.write_ca(tmp_path / "ca.pem")
    (tmp_path / "token").write_text(TOKEN)
    config = {
        "kafka": {
            "bootstrap_servers": kafka_settings.bootstrap_servers,
            "partitions": 3,
            "topics": kafka_settings.topics.model_dump(),
        },
        "vinter": {
            "ws_url": vinter.ws_url,
            "rest_url": vinter.base_url,
            "token": {"file": str(tmp_path / "token")},
            "api_key": {"env": "VINTER_API_KEY"},
            "symbols": nav,
        },
        "kaiko": {
            "target": kaiko.target,
            "ca_file": str(tmp_path / "ca.pem"),
            "api_key": {"env": "KAIKO_API_KEY"},
            "subscriptions": [{"exchange": "cbse", "instrument_class": "spot", "code": "btc-usd"}],
        },
        "settlement": {"symbols": daily, "backfill_days": 5, "interval_s": 2},
        "ops": {"host": "127.0.0.1", "port": ops_port},
        "log_level": "DEBUG",
        "shutdown_grace_s": 20,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_bridge(config: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "VINTER_API_KEY": API_KEY, "KAIKO_API_KEY": KAIKO_KEY}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bridge.cli",
        "run",
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )


async def stop(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> tuple[int, str]:
    """Signal the bridge; return its exit code and everything it printed."""
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        output = await asyncio.wait_for(proc.communicate(), timeout=25)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, output[0].decode() if output[0] else ""


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
        finally:
            code, output = await stop(proc)
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


async def test_sigkill_and_restart_loses_and_repeats_nothing(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """SIGKILL the bridge mid-stream, let the upstreams go on, restart it: every NAV record
    from the first one published to the last one emitted is in Kafka exactly once (marks
    recovered from Kafka, the outage back-filled over REST), and no VWAP interval twice."""
    bootstrap, topics = kafka_settings.bootstrap_servers, kafka_settings.topics
    symbol = NAV[0]
    async with (
        VinterSim([symbol], token=TOKEN, api_key=API_KEY, rate=40, history_days=1) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=40, resend_on_reconnect=5) as kaiko,
    ):
        config = write_config(
            tmp_path, kafka_settings, vinter, kaiko, free_port(), nav=[symbol], daily=[]
        )
        proc = await start_bridge(config)
        await read_topic(bootstrap, topics.nav_ticks, until=100, timeout=60)
        await read_topic(bootstrap, topics.vwap_ticks, until=100, timeout=60)
        code, _ = await stop(proc, signal.SIGKILL)
        assert code == -signal.SIGKILL
        emitted = len(vinter.history(symbol))
        await wait_for(lambda: len(vinter.history(symbol)) >= emitted + 80, timeout=30)

        proc = await start_bridge(config)
        try:
            await wait_for(lambda: len(vinter.history(symbol)) >= emitted + 200, timeout=30)
            vinter.rate = 0  # upstream goes quiet; everything it sent must now be in Kafka
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
            code, output = await stop(proc)
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
