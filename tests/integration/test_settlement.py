"""The settlement poller against the Vinter simulator and a real broker: exactly once, with
revisions, through REST faults, fencing and SIGKILL at random points."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from bridge.backoff import Backoff
from bridge.config import KafkaSettings, SettlementSettings
from bridge.errors import AuthError, PublishError, UpstreamError
from bridge.normalize.settlement_book import LOOKBACK_DAYS, Checkpoint
from bridge.sources.settlement import SettlementPoller
from bridge.sources.vinter_rest import VinterRest
from bridge.supervisor import Progress
from bridgedev.sim.vinter import VinterSim
from bridgedev.sim.vinter_data import SimClock
from tests.kafkautil import read_topic, values
from tests.loopreports import loop_reports

pytestmark = pytest.mark.integration

KEY = "settle-key-SENTINEL"
DAILY_PATH = "/api/v3/nav_daily/"
CHILD = Path(__file__).with_name("settlement_child.py")


def symbols(n: int) -> list[str]:
    return [f"vnfa-s{i:03d}-d" for i in range(n)]


def config(names: list[str]) -> SettlementSettings:
    """Settings of one poller instance (a fresh transactional id for each test)."""
    return SettlementSettings(
        symbols=names, transactional_id=f"settle-{uuid.uuid4().hex[:8]}", backfill_days=30
    )


def client(sim: VinterSim, key: str = KEY) -> VinterRest:
    return VinterRest(sim.base_url, SecretStr(key), backoff=Backoff(initial=0.01, cap=0.05))


@contextlib.asynccontextmanager
async def poller_for(
    sim: VinterSim, kafka: KafkaSettings, settings: SettlementSettings, key: str = KEY
) -> AsyncIterator[SettlementPoller]:
    async with client(sim, key) as rest, SettlementPoller(settings, kafka, rest) as poller:
        yield poller


async def settlements(kafka: KafkaSettings, count: int, idle: float = 0.5) -> list[dict[str, Any]]:
    """Exactly `count` committed settlement events (waits `idle` to be sure of no more)."""
    records = await read_topic(
        kafka.bootstrap_servers, kafka.topics.settlements, until=count, idle=idle
    )
    found = values(records)
    assert len(found) == count
    return found


def of(events: list[dict[str, Any]], symbol: str) -> list[dict[str, Any]]:
    return [e["data"] for e in events if e["subject"] == symbol]


async def test_backfill_then_one_revision_for_a_correction(kafka_settings: KafkaSettings) -> None:
    names = symbols(3)
    settings = config(names)
    async with VinterSim(names, token="t", api_key=KEY, history_days=30) as sim:
        async with poller_for(sim, kafka_settings, settings) as poller:
            report = await poller.poll()
            assert (report.settlements, report.revisions, report.dead_letters) == (90, 0, 0)
            first = await settlements(kafka_settings, 90)
            for symbol in names:
                data = of(first, symbol)
                assert [d["date"] for d in data] == [r["date"] for r in sim.history(symbol)]
                assert {d["revision"] for d in data} == {1}
                assert len(data) == 30

            assert (await poller.poll()).settlements == 0  # unchanged: nothing
            sim.add_unofficial(names[0])  # today's slot, id == 0
            assert (await poller.poll()).settlements == 0

            last = sim.history(names[1])[-1]
            corrected = sim.correct(names[1], last["date"], close=last["close"] + 1.25)
            report = await poller.poll()
            assert (report.settlements, report.revisions) == (1, 1)
            assert (await poller.poll()).settlements == 0

        # A new instance (same transactional id) carries on from the committed checkpoints.
        async with poller_for(sim, kafka_settings, settings) as again:
            assert (await again.poll()).settlements == 0
            sim.append(names[2])
            assert (await again.poll()).settlements == 1

    found = await settlements(kafka_settings, 92, idle=1.0)
    assert all(d["upstream_id"] != 0 for d in (e["data"] for e in found))
    revision_two = [e for e in found if e["data"]["revision"] > 1]
    assert len(revision_two) == 1
    data = revision_two[0]["data"]
    assert (data["symbol"], data["date"], data["revision"], data["supersedes"]) == (
        names[1],
        last["date"],
        2,
        1,
    )
    assert (data["close"], data["updated_at"]) == (corrected["close"], corrected["updated_at"])
    assert revision_two[0]["id"] == f"settlement:{names[1]}:{last['date']}:2"
    assert len({e["id"] for e in found}) == 92
    today = of(found, names[0])
    assert len(today) == 30  # the unofficial value of today never settled


async def test_429_500s_and_a_cut_body_are_retried(kafka_settings: KafkaSettings) -> None:
    names = symbols(1)
    async with VinterSim(names, token="t", api_key=KEY, history_days=30) as sim:
        sim.rest_fail = [(429, {"Retry-After": "0.3"}), 500, 503, "truncated"]
        async with poller_for(sim, kafka_settings, config(names)) as poller:
            began = time.monotonic()
            report = await poller.poll()
            assert time.monotonic() - began >= 0.3  # Retry-After was honoured
        assert sim.rest_requests[DAILY_PATH] == 5
    assert (report.settlements, report.dead_letters) == (30, 0)
    await settlements(kafka_settings, 30)


async def test_a_run_of_500s_fails_the_poll_after_committing_the_rest(
    kafka_settings: KafkaSettings,
) -> None:
    names = symbols(2)
    async with VinterSim(names, token="t", api_key=KEY, history_days=30) as sim:
        sim.rest_fail = [500] * 5  # all five attempts for the first symbol
        async with poller_for(sim, kafka_settings, config(names)) as poller:
            with pytest.raises(UpstreamError) as info:
                await poller.poll()
            assert info.value.retriable
            assert sim.rest_requests[DAILY_PATH] == 6
            only = await settlements(kafka_settings, 30)
            assert {e["subject"] for e in only} == {names[1]}
            assert (await poller.poll()).settlements == 30
    both = await settlements(kafka_settings, 60)
    assert Counter(e["subject"] for e in both) == dict.fromkeys(names, 30)


async def test_a_truncated_body_is_dead_lettered_and_the_poller_goes_on(
    kafka_settings: KafkaSettings,
) -> None:
    names = symbols(2)
    async with VinterSim(names, token="t", api_key=KEY, history_days=30) as sim:
        sim.rest_fail = ["truncated_json"]
        async with poller_for(sim, kafka_settings, config(names)) as poller:
            report = await poller.poll()
            assert (report.settlements, report.dead_letters) == (30, 1)
            assert (await poller.poll()).settlements == 30
        assert sim.rest_requests[DAILY_PATH] == 4
    dead = values(
        await read_topic(
            kafka_settings.bootstrap_servers, kafka_settings.topics.dlq, until=1, idle=0.5
        )
    )
    assert len(dead) == 1
    assert dead[0]["type"] == "bridge.deadletter"
    assert dead[0]["subject"] == names[0]
    assert dead[0]["data"]["reason"] == "bad_body"
    assert dead[0]["data"]["raw"]
    await settlements(kafka_settings, 60)


async def test_a_record_that_cannot_settle_is_dead_lettered_once(
    kafka_settings: KafkaSettings,
) -> None:
    names = symbols(1)
    async with (
        VinterSim(names, token="t", api_key=KEY, history_days=30) as sim,
        poller_for(sim, kafka_settings, config(names)) as poller,
    ):
        assert (await poller.poll()).settlements == 30
        last = sim.history(names[0])[-1]
        sim.correct(names[0], last["date"], close=float("nan"))  # served as "close": null
        report = await poller.poll()
        assert (report.settlements, report.dead_letters) == (0, 1)
        assert (await poller.poll()).dead_letters == 0  # refused once, not every poll
    bootstrap, dlq = kafka_settings.bootstrap_servers, kafka_settings.topics.dlq
    dead = values(await read_topic(bootstrap, dlq, until=1, idle=1.0))
    assert [(d["source"], d["subject"], d["data"]["reason"]) for d in dead] == [
        ("vinter.settlement", names[0], "missing_field")
    ]
    assert orjson.loads(dead[0]["data"]["raw"])["date"] == last["date"]
    await settlements(kafka_settings, 30)


async def test_401_raises_auth_error_from_the_session_after_one_request(
    kafka_settings: KafkaSettings,
) -> None:
    names = symbols(3)
    async with VinterSim(names, token="t", api_key=KEY, history_days=30) as sim:
        async with client(sim, key="wrong-key-SENTINEL") as rest:
            poller = SettlementPoller(config(names), kafka_settings, rest)
            with pytest.raises(AuthError) as info:
                await poller.session(Progress())
        assert sim.rest_requests[DAILY_PATH] == 1
    assert "vinter.api_key" in str(info.value)
    assert "SENTINEL" not in str(info.value)


async def test_a_second_instance_fences_the_first(kafka_settings: KafkaSettings) -> None:
    """The fenced instance stops with a clear error, and without the "Future exception was
    never retrieved" ERRORs aiokafka's futures would leave."""
    names = symbols(1)
    settings = config(names)
    async with (
        loop_reports() as reported,
        VinterSim(names, token="t", api_key=KEY, history_days=30) as sim,
        poller_for(sim, kafka_settings, settings) as first,
    ):
        assert (await first.poll()).settlements == 30
        async with poller_for(sim, kafka_settings, settings) as second:
            sim.append(names[0])
            with pytest.raises(PublishError, match="fenced"):
                await first.poll()
            assert (await second.poll()).settlements == 1
    assert reported == []
    found = await settlements(kafka_settings, 31, idle=1.0)
    assert len({e["id"] for e in found}) == 31


# -- SIGKILL at random points ----------------------------------------------------------------


def check_exactly_once(
    events: list[dict[str, Any]], checkpoints: list[tuple[str, bytes]], sim: VinterSim
) -> None:
    """Every invariant of the committed topics, against the simulator's final state."""
    keys = [(d["symbol"], d["date"], d["revision"]) for d in (e["data"] for e in events)]
    duplicates = [k for k, n in Counter(keys).items() if n > 1]
    assert not duplicates, duplicates[:5]
    revisions: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for event in events:
        data = event["data"]
        assert data["upstream_id"] != 0
        revisions.setdefault((data["symbol"], data["date"]), []).append(data)
    for (symbol, day), found in revisions.items():
        assert [d["revision"] for d in found] == list(range(1, len(found) + 1)), (symbol, day)
        assert [d["supersedes"] for d in found] == [None, *range(1, len(found))]
    # Checkpoints never ahead: each names only revisions that were committed.
    for key, raw in checkpoints:
        checkpoint = Checkpoint.from_bytes(raw)
        assert key == f"settlement:{checkpoint.symbol}"
        for day, settled in checkpoint.settled.items():
            assert settled.revision <= len(revisions.get((checkpoint.symbol, day), [])), key
    # The final state: every official close settled, the last revision as upstream has it.
    for symbol in sim.symbols:
        for record in sim.history(symbol):
            found = revisions.get((symbol, record["date"]), [])
            if record["id"] == 0:
                assert not found
                continue
            assert found, (symbol, record["date"])
            last = found[-1]
            assert (last["close"], last["high"], last["low"], last["updated_at"]) == (
                record["close"],
                record["high"],
                record["low"],
                record["updated_at"],
            )


def mutate(sim: VinterSim, rng: random.Random) -> None:
    """One upstream change: a new day, a correction of a recent close, or an unofficial value."""
    symbol = rng.choice(sim.symbols)
    choice = rng.random()
    now_ms = int(time.time() * 1000)
    if choice < 0.35 and sim.clock.peek(symbol) < now_ms:
        sim.append(symbol)
    elif choice < 0.9:
        recent = [r for r in sim.history(symbol)[-LOOKBACK_DAYS:] if r["id"] != 0]
        record = rng.choice(recent)
        sim.correct(
            symbol, record["date"], close=round(record["close"] * rng.uniform(0.97, 1.03), 2)
        )
    elif sim.clock.peek(symbol) < now_ms:
        with contextlib.suppress(ValueError):
            sim.add_unofficial(symbol)


async def test_sigkill_at_random_points_keeps_exactly_once(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    seed = int(os.environ.get("SETTLEMENT_KILL_SEED") or random.randrange(1 << 30))
    print(f"SETTLEMENT_KILL_SEED={seed}")  # shown if the test fails: rerun with it
    rng = random.Random(seed)
    names = symbols(20)
    clock = SimClock(start=datetime.now(UTC) - timedelta(days=12))
    child_env = {
        "bootstrap": kafka_settings.bootstrap_servers,
        "topics": kafka_settings.topics.model_dump(),
        "symbols": names,
        "transactional_id": f"settle-kill-{uuid.uuid4().hex[:8]}",
        "api_key": KEY,
    }
    log_path = tmp_path / "child.log"

    def note(what: str) -> None:
        with log_path.open("a") as log:
            log.write(f"{datetime.now(UTC).isoformat()} -- {what}\n")

    async def spawn(sim: VinterSim, mode: str) -> asyncio.subprocess.Process:
        env = {
            **os.environ,
            "SETTLEMENT_CHILD": orjson.dumps(
                {**child_env, "rest_url": sim.base_url, "mode": mode}
            ).decode(),
        }
        with log_path.open("ab") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, str(CHILD), env=env, stdout=asyncio.subprocess.PIPE, stderr=log
            )

    async with VinterSim(names, token="t", api_key=KEY, history_days=10, clock=clock) as sim:
        kills = 0
        for _ in range(10):
            for _ in range(rng.randint(1, 6)):
                mutate(sim, rng)
            child = await spawn(sim, "forever")
            note("spawned")
            try:
                # Mostly while polling (timed from `ready`), sometimes while still starting.
                if rng.random() < 0.7:
                    assert child.stdout is not None
                    line = await asyncio.wait_for(child.stdout.readline(), timeout=30)
                    assert line == b"ready\n", log_path.read_text()[-3000:]
                deadline = time.monotonic() + rng.uniform(0.05, 1.5)
                while (left := deadline - time.monotonic()) > 0:  # upstream changes meanwhile
                    await asyncio.sleep(min(left, rng.uniform(0.01, 0.2)))
                    mutate(sim, rng)
                assert child.returncode is None, log_path.read_text()[-3000:]
                child.send_signal(signal.SIGKILL)
                note("killed")
                kills += 1
            finally:
                if child.returncode is None:
                    child.kill()
                await child.wait()
        assert kills == 10
        mutate(sim, rng)
        final = await spawn(sim, "once")
        try:
            out, _ = await asyncio.wait_for(final.communicate(), timeout=60)
            assert b'"settlements"' in out
        finally:
            if final.returncode is None:
                final.kill()
                await final.wait()
        assert final.returncode == 0, log_path.read_text()[-3000:]

        bootstrap, topics = kafka_settings.bootstrap_servers, kafka_settings.topics
        events = values(
            await read_topic(bootstrap, topics.settlements, until=bool, timeout=30, idle=1.0)
        )
        state = await read_topic(bootstrap, topics.state, until=bool, timeout=30, idle=1.0)
        checkpoints = [(r.key.decode(), r.value) for r in state if r.key and r.value]
        assert len(checkpoints) >= len(names)
        check_exactly_once(events, checkpoints, sim)
        # The newest checkpoint of each symbol is exactly the committed revisions.
        newest = {key: Checkpoint.from_bytes(raw) for key, raw in checkpoints}
        for checkpoint in newest.values():
            for day, settled in checkpoint.settled.items():
                committed = [
                    e
                    for e in events
                    if (e["subject"], e["data"]["date"]) == (checkpoint.symbol, day)
                ]
                assert settled.revision == len(committed)
