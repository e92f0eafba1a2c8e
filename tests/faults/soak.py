"""The soak's instruments: its scale, the faults it injects, a tail of the NAV topic that says
when everything sent has arrived, and memory samples of every bridge process and child.

`SOAK_SCALE=full` (`make soak`) runs the issue's scale; the default is CI's short variant of
the same scenario. Every fault returns what it did and for how long, for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, TopicPartition

from bridge.aiokafka_internals import client_of, partitions_now
from bridgedev.localkafka import LocalKafka, LocalKafkaCluster
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from tests.faults.harness import BridgeProcess, leader_of, wait_in_sync

REQUEST_TIMEOUT_S = 30.0  # the bridge's default kafka.request_timeout_ms
SESSION_TIMEOUT_S = 10.0  # the default shards.session_timeout_ms
SHORT_PAUSE_S = 12.0
LONG_PAUSE_S = REQUEST_TIMEOUT_S + 10  # requests to the hung leader time out first
TWO_BROKERS_S = 65.0  # past 60 s with min.insync.replicas out of reach


@dataclass(frozen=True)
class Scale:
    """How much of everything one run does."""

    name: str
    events: int  # NAV events at least, at RATE
    bounces: int  # SIGKILL + restart of a partition leader
    short_pauses: int  # SIGSTOP of a leader for SHORT_PAUSE_S (plus the two long ones)
    bridge_kills: int
    bridge_stops: int  # SIGSTOP of a replica past the session timeout
    upstream_drops: int  # every feed at once: sockets, gRPC streams, REST errors
    settlement_kills: int
    dwell_s: float  # steady load after each fault's recovery, before the next fault


SCALES = {
    "ci": Scale("ci", 10_000, 1, 0, 1, 1, 1, 5, dwell_s=0.0),
    # about 30 minutes in all: long enough for slow growth of memory to show
    "full": Scale("full", 100_000, 5, 3, 3, 2, 3, 20, dwell_s=60.0),
}


def scale() -> Scale:
    name = os.environ.get("SOAK_SCALE", "ci")
    if name not in SCALES:
        raise ValueError(f"SOAK_SCALE={name!r}: one of {sorted(SCALES)}")
    return SCALES[name]


@dataclass
class Fault:
    """One fault as it ran: when, for how long, and how the service came through it."""

    kind: str
    target: str
    at: float  # seconds since the first fault began
    length_s: float  # how long the fault itself lasted
    started: float  # monotonic
    ended: float  # monotonic
    recovered_s: float = 0.0  # from its end until every replica held every shard, caught up
    events_per_s: float = 0.0  # NAV events committed per second while it lasted

    def finish(self, whole: float, tail: NavTail) -> None:
        """Everything sent had arrived at `whole` (monotonic)."""
        self.recovered_s = whole - self.ended
        done = tail.count_at(self.ended) - tail.count_at(self.started)
        self.events_per_s = done / max(self.ended - self.started, 1e-3)

    def figures(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "target": self.target,
            "at_s": round(self.at, 1),
            "length_s": round(self.length_s, 1),
            "recovered_s": round(self.recovered_s, 1),
            "events_per_s": round(self.events_per_s),
        }


async def run_fault(
    kind: str,
    step: Callable[[], Awaitable[tuple[str, float]]],
    began: float,
    cluster: LocalKafkaCluster,
    topics: list[str],
) -> Fault:
    """Inject one fault, then wait until every broker is up and every replica in sync."""
    start = time.monotonic()
    print(f"{start - began:7.1f}s {kind} ...", flush=True)  # progress of a long run
    target, length = await step()
    ended = time.monotonic()
    await wait_in_sync(cluster, topics, timeout=180)
    return Fault(kind, target, start - began, length, start, ended)


# -- the faults ------------------------------------------------------------------------------


async def bounce(cluster: LocalKafkaCluster, topic: str, partition: int) -> tuple[str, float]:
    """SIGKILL the leader of `topic`/`partition` and start it again."""
    node = await leader_of(cluster, topic, partition)
    began = time.monotonic()
    await asyncio.to_thread(node.kill)
    await asyncio.to_thread(node.start)  # returns once the node is registered again
    return f"node {node.node_id}", time.monotonic() - began


async def pause(nodes: Iterable[LocalKafka], seconds: float) -> tuple[str, float]:
    """SIGSTOP `nodes` for `seconds`, then SIGCONT."""
    chosen = list(nodes)
    for node in chosen:
        node.pause()
    try:
        await asyncio.sleep(seconds)  # the fault itself: brokers hung for this long
    finally:
        for node in chosen:
            node.resume()
    return "nodes " + ",".join(str(n.node_id) for n in chosen), seconds


async def pause_leader(
    cluster: LocalKafkaCluster, topic: str, partition: int, seconds: float
) -> tuple[str, float]:
    return await pause([await leader_of(cluster, topic, partition)], seconds)


async def kill_bridge(bridge: BridgeProcess) -> tuple[str, float]:
    """SIGKILL a replica and start it again at once (a pod restarted in place)."""
    began = time.monotonic()
    await bridge.kill()
    await bridge.start()
    return bridge.config.parent.name, time.monotonic() - began


async def stop_bridge(bridge: BridgeProcess) -> tuple[str, float]:
    """SIGSTOP a replica past the session timeout, then SIGCONT: its shards have moved."""
    assert bridge.proc is not None
    seconds = SESSION_TIMEOUT_S + 5
    bridge.proc.send_signal(signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)  # the fault itself: a replica frozen this long
    finally:
        bridge.proc.send_signal(signal.SIGCONT)
    return bridge.config.parent.name, seconds


async def drop_upstreams(vinter: VinterSim, kaiko: KaikoSim) -> tuple[str, float]:
    """Every feed fails at once: NAV sockets cut, gRPC streams closed for 3 s, the next
    REST answers 503, 500 and 429."""
    began = time.monotonic()
    vinter.rest_fail += [503, 500, (429, {"Retry-After": "1"})]
    sockets = await vinter.drop_all("abrupt")
    await kaiko.close_connections(down_for=3.0)
    return f"{sockets} sockets, gRPC, REST", time.monotonic() - began


# -- the NAV topic, followed -----------------------------------------------------------------


@dataclass
class NavTail:
    """The distinct NAV event ids committed so far (read_committed, from the beginning),
    with a timeline of their count."""

    bootstrap: str
    topic: str
    seen: set[str] = field(default_factory=set)
    newest: dict[str, int] = field(default_factory=dict)  # symbol -> its newest timestamp
    timeline: list[tuple[float, int]] = field(default_factory=list)
    _read: asyncio.Event = field(default_factory=asyncio.Event)

    async def follow(self) -> None:
        """Read for ever (cancel to stop), through broker outages, in a child process."""
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.faults.nav_tail_child",
            self.bootstrap,
            self.topic,
            stdout=asyncio.subprocess.PIPE,
            limit=64 << 20,
        )
        assert child.stdout is not None
        try:
            while line := await child.stdout.readline():
                for event_id in line.split():
                    self._add(event_id.decode())
                self.timeline.append((time.monotonic(), len(self.seen)))
                self._read.set()
            raise AssertionError(f"the NAV tail exited with {await child.wait()}")
        finally:
            if child.returncode is None:
                child.kill()
                await child.wait()

    def _add(self, event_id: str) -> None:
        self.seen.add(event_id)
        _, symbol, timestamp, _ = event_id.split(":")
        self.newest[symbol] = max(self.newest.get(symbol, 0), int(timestamp))

    async def fresh(self, after: Mapping[str, int], timeout: float) -> float:
        """Wait until every symbol of `after` has an event newer than the timestamp given
        for it; returns when."""
        async with asyncio.timeout(timeout):
            while any(self.newest.get(s, -1) <= ts for s, ts in after.items()):
                self._read.clear()
                await self._read.wait()
        return time.monotonic()

    def count_at(self, moment: float) -> int:
        """How many distinct ids had arrived at `moment` (monotonic)."""
        return max((n for at, n in self.timeline if at <= moment), default=0)

    async def caught_up(self, expected: Callable[[], set[str]], timeout: float) -> float:
        """Wait until every id of `expected()` (as of this call) has arrived; returns when."""
        wanted = expected()
        try:
            async with asyncio.timeout(timeout):
                while not wanted <= self.seen:
                    self._read.clear()
                    await self._read.wait()
        except TimeoutError:
            missing = sorted(wanted - self.seen)
            print(await explain_missing(self.bootstrap, self.topic, missing[0]), flush=True)
            raise AssertionError(
                f"{len(missing)} NAV events still missing after {timeout:.0f}s: {missing[:5]}"
            ) from None
        return time.monotonic()


async def _read_topic(bootstrap: str, topic: str, isolation: str) -> list[Any]:
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, isolation_level=isolation
    )
    await consumer.start()
    try:
        parts = await partitions_now(client_of(consumer), topic)
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        found: list[Any] = []
        async with asyncio.timeout(60):
            while any([await consumer.position(tp) < ends[tp] for tp in tps]):
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    found += records
        return found
    finally:
        await consumer.stop()


async def explain_missing(bootstrap: str, nav_topic: str, event_id: str) -> str:
    """Where a missing NAV event's symbol stands: its records in the log (committed, and
    all), and its mark in each shard checkpoint of the NAV topic."""
    symbol = event_id.split(":")[1]
    prefix = nav_topic.rsplit(".", 1)[0]
    lines = [f"explaining {event_id}"]
    for record in await _read_topic(bootstrap, f"{prefix}.state", "read_committed"):
        key = (record.key or b"").decode()
        if key.startswith(f"marks:{nav_topic}@"):
            doc = orjson.loads(record.value)
            lines.append(
                f"  {record.offset} {key} offsets={doc.get('offsets')} "
                f"marks={len(doc.get('marks', {}))} {symbol}={doc.get('marks', {}).get(symbol)}"
            )
    for isolation in ("read_committed", "read_uncommitted"):
        mine = [
            (r.partition, r.offset, int(orjson.loads(r.value)["id"].split(":")[2]))
            for r in await _read_topic(bootstrap, nav_topic, isolation)
            if f":{symbol}:" in orjson.loads(r.value)["id"]
        ]
        stamps = sorted(ts for _, _, ts in mine)
        holes = [(a, b) for a, b in itertools.pairwise(stamps) if b - a > 1000]
        lines.append(
            f"  {isolation}: {len(mine)} records, first {mine[:1]}, last {mine[-1:]}, "
            f"holes {holes[:3]}"
        )
    return "\n".join(lines)


def newest_emitted(vinter: VinterSim, symbols: Iterable[str]) -> dict[str, int]:
    """Per symbol, the timestamp of the last record the simulator pushed (-1: none yet)."""
    return {
        s: int(vinter.emitted(s)[-1]["timestamp"]) if vinter.emitted(s) else -1 for s in symbols
    }


def emitted_ids(vinter: VinterSim, symbols: Iterable[str]) -> set[str]:
    return {f"nav:{s}:{r['timestamp']}:1" for s in symbols for r in vinter.emitted(s)}


# -- memory ----------------------------------------------------------------------------------


def rss_mib(pid: int) -> float:
    """Resident set size of `pid` (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (its receiver children, theirs, ...)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                    children = [int(c) for c in (task / "children").read_text().split()]
                    found += children
                    todo += children
    return found


@dataclass
class Memory:
    """Peak RSS per replica process and per child process, sampled every `period_s`."""

    bridges: list[BridgeProcess]
    period_s: float = 1.0
    peaks: dict[str, float] = field(default_factory=dict)
    samples: list[tuple[float, dict[str, float]]] = field(default_factory=list)

    def sample(self) -> dict[str, float]:
        now: dict[str, float] = {}
        for bridge in self.bridges:
            if bridge.proc is None or bridge.proc.returncode is not None:
                continue
            name = bridge.config.parent.name
            now[name] = rss_mib(bridge.proc.pid)
            for i, child in enumerate(sorted(descendants(bridge.proc.pid))):
                now[f"{name} child {i}"] = rss_mib(child)
        for name, value in now.items():
            self.peaks[name] = max(self.peaks.get(name, 0.0), value)
        self.samples.append((time.monotonic(), now))
        return now

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(self.period_s)  # the sampling period
