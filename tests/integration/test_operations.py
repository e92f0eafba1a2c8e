"""Operating the service: readiness follows Kafka, metrics match Kafka, SIGTERM under load."""

from __future__ import annotations

import asyncio
import re
import signal
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import KafkaSettings, Topics
from bridgedev.localkafka import LocalKafka
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import (
    API_KEY,
    KAIKO_KEY,
    TOKEN,
    free_port,
    get,
    start_bridge,
    stop,
    wait_status,
    write_config,
)
from tests.kafkautil import read_topic

pytestmark = pytest.mark.integration

SYMBOLS = [f"vnfa-t{i:02d}-r" for i in range(4)]


def published_by_topic(metrics_text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "bridge_events_published":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    counts[sample.labels["topic"]] = sample.value
    return counts


async def test_readiness_follows_kafka(tmp_path: Path) -> None:
    """503 while Kafka is not there, 200 once it and the sources are up, 503 when it stops."""
    broker = LocalKafka()
    settings = KafkaSettings(
        bootstrap_servers=broker.bootstrap, topics=Topics.prefixed(f"r{uuid.uuid4().hex[:6]}")
    )
    ops = free_port()
    ready = f"http://127.0.0.1:{ops}/readyz"
    async with (
        VinterSim(SYMBOLS[:1], token=TOKEN, api_key=API_KEY, rate=5) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=5) as kaiko,
    ):
        config = write_config(tmp_path, settings, vinter, kaiko, ops, nav=SYMBOLS[:1], daily=[])
        proc = await start_bridge(config)
        try:
            await wait_status(f"http://127.0.0.1:{ops}/healthz", 200, timeout=30)
            status, body = await get(ready)
            assert status == 503
            assert '"kafka": "down"' in body
            await broker.astart()
            await wait_status(ready, 200, timeout=90)
            await broker.astop(keep_dir=True)
            await wait_status(ready, 503, timeout=60)
            await broker.astart()  # back, so the bridge can flush and stop cleanly
            await wait_status(ready, 200, timeout=90)
        finally:
            code, output = await stop(proc, config)
            await broker.astop()
    assert code == 0, output[-3000:]
    # one line per attempt while Kafka is not there at start: the bridge's, naming the address
    assert f"Kafka at {broker.bootstrap} is not reachable" in output
    assert 'Unable connect to \\"' not in output  # aiokafka's own line for a failed bootstrap


async def test_metrics_match_kafka_and_sigterm_under_load_loses_nothing(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    bootstrap, topics = kafka_settings.bootstrap_servers, kafka_settings.topics
    ops = free_port()
    async with (
        VinterSim(SYMBOLS, token=TOKEN, api_key=API_KEY, rate=300) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=300) as kaiko,
    ):
        config = write_config(tmp_path, kafka_settings, vinter, kaiko, ops, nav=SYMBOLS, daily=[])
        proc = await start_bridge(config)
        try:
            await wait_status(f"http://127.0.0.1:{ops}/readyz", 200, timeout=60)
            await read_topic(bootstrap, topics.nav_ticks, until=2000, timeout=60)
            # Quiet upstreams: once nothing moves, /metrics must agree with Kafka.
            vinter.rate = 0
            kaiko.stall()
            nav = await read_topic(bootstrap, topics.nav_ticks, idle=2.0, timeout=60)
            vwap = await read_topic(bootstrap, topics.vwap_ticks, idle=2.0, timeout=60)
            _, text = await get(f"http://127.0.0.1:{ops}/metrics")
            counts = published_by_topic(text)
            assert counts[topics.nav_ticks] == len(nav)
            assert counts[topics.vwap_ticks] == len(vwap)
            # Load again, then SIGTERM in the middle of it.
            vinter.rate = 300
            kaiko.unstall()
            await read_topic(bootstrap, topics.nav_ticks, until=len(nav) + 2000, timeout=60)
            started = asyncio.get_running_loop().time()
            code, output = await stop(proc, config, signal.SIGTERM)
            took = asyncio.get_running_loop().time() - started
        finally:
            if proc.returncode is None:
                await stop(proc, config, signal.SIGKILL)
    assert code == 0, output[-3000:]
    assert took < 20  # shutdown_grace_s
    summary = re.search(
        r"stopped: (\d+) events acknowledged by Kafka, (\d+) dead letters, (\d+) lost", output
    )
    assert summary, output[-3000:]
    acknowledged, lost = int(summary[1]), int(summary[3])
    assert lost == 0
    in_kafka = 0
    for topic in (topics.nav_ticks, topics.vwap_ticks, topics.dlq, topics.state):
        in_kafka += len(await read_topic(bootstrap, topic, idle=1.0, timeout=60))
    assert in_kafka == acknowledged  # every acknowledged event is there, and nothing else
