"""Running `kaiko-bridge run` as a real process against the simulators, for tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import yaml

from bridge.config import KafkaSettings
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim

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
        # a group and transactional ids of this test's own (the topics' prefix is unique)
        "shards": {
            "group_id": f"{kafka_settings.topics.control}.group",
            "transactional_id_prefix": f"{kafka_settings.topics.control}.tx",
        },
        "ops": {"host": "127.0.0.1", "port": ops_port},
        "log_level": "DEBUG",
        "shutdown_grace_s": 20,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def start_bridge(config: Path) -> asyncio.subprocess.Process:
    """The bridge as a child process; its output goes to a file beside the config (a pipe
    nobody reads would fill up and block its logging)."""
    env = {**os.environ, "VINTER_API_KEY": API_KEY, "KAIKO_API_KEY": KAIKO_KEY}
    log = config.with_suffix(".log").open("ab")
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bridge.cli",
            "run",
            "--config",
            str(config),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
    finally:
        log.close()


async def stop(
    proc: asyncio.subprocess.Process, config: Path, sig: int = signal.SIGTERM
) -> tuple[int, str]:
    """Signal the bridge; return its exit code and everything it printed."""
    if proc.returncode is None:
        proc.send_signal(sig)
    try:
        await asyncio.wait_for(proc.wait(), timeout=25)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    output = config.with_suffix(".log").read_text(errors="replace")
    return proc.returncode or 0, output
