"""What a user reads: children's stderr and upstream error bodies redacted, a 404 that names
the URL it tried, a bridge that starts on new topics without an ERROR line, and children that
leave quietly when the bridge is SIGKILLed."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import orjson
import pytest
from pydantic import SecretStr

from bridge.config import KafkaSettings
from bridge.errors import UpstreamError
from bridge.publish import Publisher
from bridge.sources import childproc
from bridge.sources.nav_ws import NavSocketSource
from bridge.sources.vinter_rest import VinterRest
from bridge.sources.worker import Worker
from bridge.state import MarkBook
from bridge.supervisor import Progress
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import (
    API_KEY,
    KAIKO_KEY,
    NAV,
    TOKEN,
    free_port,
    start_bridge,
    stop,
    wait_status,
    write_config,
)
from tests.integration.test_nav_ws import KEY, rest_client, vinter
from tests.integration.test_nav_ws import TOKEN as WS_TOKEN
from tests.kafkautil import read_topic, wait_for

pytestmark = pytest.mark.integration

REAL_TIME = "vnfa-btca-15-r"
CHILD = "tests.integration.noisy_child"


async def test_what_a_child_writes_to_stderr_is_logged_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="bridge.sources.childproc"):
        proc = await childproc.spawn(CHILD)
        assert proc.stdin is not None
        proc.stdin.write(b"wss://h/ws/nav/x/?token=SENTINEL-c0ffee&a=1\n")
        await childproc.stop(proc, grace_s=10)
        await wait_for(lambda: "last line" in caplog.text, timeout=10)
    assert "SENTINEL" not in caplog.text
    logged = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    name = "bridge.sources.childproc.noisy_child"
    assert (name, logging.WARNING, "url wss://h/ws/nav/x/?token=***&a=1") in logged
    # gRPC's own lines are for debugging gRPC: the call's status says what failed
    assert any(lvl == logging.DEBUG and "chttp2_transport" in msg for _, lvl, msg in logged)
    assert any(lvl == logging.DEBUG and "Got goaway" in msg for _, lvl, msg in logged)
    assert any("Traceback" in msg for _, _, msg in logged)
    assert max(len(msg) for _, _, msg in logged) <= childproc.MAX_STDERR_LINE


async def test_upstream_error_bodies_are_redacted_and_cut() -> None:
    async with VinterSim([REAL_TIME], token=WS_TOKEN, api_key=KEY) as sim:
        echo = f"bad request from key {KEY}: " + "x" * 5000
        sim.rest_fail = [(400, {}, echo.encode())]
        async with VinterRest(sim.base_url, SecretStr(KEY)) as rest:
            with pytest.raises(UpstreamError) as caught:
                await rest.fetch("real-time", REAL_TIME)
    text = str(caught.value)
    assert "HTTP 400" in text
    assert KEY not in text
    assert "bad request from key ***" in text
    assert len(text) < 400


async def test_a_404_names_the_url_it_tried(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    unknown = "vnfa-nope-99-r"
    async with (
        VinterSim([REAL_TIME], token=WS_TOKEN, api_key=KEY) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        source = NavSocketSource(
            unknown, vinter(sim), publisher, MarkBook("t"), rest, receiver=nav_receiver
        )
        with pytest.raises(UpstreamError) as socket_error:
            await source.session(Progress())
        with pytest.raises(UpstreamError) as rest_error:
            await rest.fetch("real-time", unknown)
    assert f"HTTP 404 at {sim.ws_url}/ws/nav/{unknown}/ (check vinter.ws_url)" in str(
        socket_error.value
    )
    assert "token" not in str(socket_error.value)
    assert f"HTTP 404 for {sim.base_url}/api/v3/nav_real_time/ (check vinter.rest_url)" in str(
        rest_error.value
    )


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().split(") ")[-1].startswith("Z"))


async def test_a_first_start_is_quiet_and_a_sigkill_leaves_no_child_and_no_traceback(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """On topics that do not exist yet the bridge creates them and starts with no ERROR
    line; SIGKILLed, its receiver children exit at once, and nothing more is printed."""
    async with (
        VinterSim(NAV, token=TOKEN, api_key=API_KEY, rate=20) as vinter_sim,
        KaikoSim(api_key=KAIKO_KEY, rate=50) as kaiko_sim,
    ):
        ops_port = free_port()
        config = write_config(
            tmp_path, kafka_settings, vinter_sim, kaiko_sim, ops_port, nav=NAV, daily=[]
        )
        proc = await start_bridge(config)
        try:
            await wait_status(f"http://127.0.0.1:{ops_port}/readyz", 200, timeout=90)
            children = _children(proc.pid)
            assert len(children) == 2  # the NAV receiver and one VWAP receiver
            # the first events on the new topics (where NotLeaderForPartition comes from)
            await read_topic(
                kafka_settings.bootstrap_servers, kafka_settings.topics.nav_ticks, until=20
            )
            before = config.with_suffix(".log").read_text()
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            await wait_for(lambda: not any(_alive(c) for c in children), timeout=10)
        finally:
            code, output = await stop(proc, config)
    assert code == -signal.SIGKILL
    errors = [line for line in before.splitlines() if orjson.loads(line)["level"] == "ERROR"]
    assert errors == [], errors[:5]
    assert output[len(before) :].strip() == ""
    assert "Traceback" not in output
