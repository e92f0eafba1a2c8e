"""The pieces fault scenarios share: the bridge as a process on the cluster, a paced load,
partition leaders and in-sync replicas read from metadata, RSS samples, secret scans.

Everything waits on conditions with a deadline; the only fixed sleeps pace the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiokafka import AIOKafkaClient
from aiokafka.protocol.metadata import MetadataRequest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import KafkaSettings
from bridgedev.localkafka import LocalKafka, LocalKafkaCluster
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
from tests.faults.checker import Verdict, against_simulators

# The symbols of the end-to-end scenarios: two real-time NAV feeds and a daily close.
NAV = ["vnfa-btca-15-r", "vnfa-etha-10-r"]
DAILY = ["vnfa-btca-15-d"]

SECRETS = (TOKEN, API_KEY, KAIKO_KEY)
METADATA_TIMEOUT_S = 5.0


# -- the bridge process ----------------------------------------------------------------------


def fault_config(
    tmp_path: Path,
    settings: KafkaSettings,
    vinter: VinterSim,
    kaiko: KaikoSim,
    ops_port: int,
    *,
    nav: list[str],
    daily: list[str],
    kafka: Mapping[str, Any] | None = None,
    settlement: Mapping[str, Any] | None = None,
) -> Path:
    """`tests.bridgeproc.write_config` plus what the cluster needs: the replication factor
    and `min.insync.replicas` of `settings` for the topics the bridge creates, a
    transactional id of this test's own, and any `kafka` / `settlement` overrides."""
    path = write_config(tmp_path, settings, vinter, kaiko, ops_port, nav=nav, daily=daily)
    config = yaml.safe_load(path.read_text())
    config["kafka"].update(
        {
            "replication_factor": settings.replication_factor,
            "min_insync_replicas": settings.min_insync_replicas,
            "linger_ms": settings.linger_ms,
            **(kafka or {}),
        }
    )
    config["settlement"].update(
        {"transactional_id": f"{settings.topics.state}.tx", **(settlement or {})}
    )
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class BridgeProcess:
    """`kaiko-bridge run` as a child process, restartable; its output goes to one file."""

    config: Path
    ops_port: int
    proc: asyncio.subprocess.Process | None = None
    starts: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.ops_port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the bridge is not running")
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.config.with_suffix(".log")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            raise RuntimeError("the bridge is already running")
        self.proc = await start_bridge(self.config)
        self.starts += 1

    async def wait_ready(self, timeout: float = 90.0) -> float:
        """Wait for `/readyz` 200; returns how long it took."""
        began = time.monotonic()
        await wait_status(f"{self.base}/readyz", 200, timeout=timeout)
        return time.monotonic() - began

    async def kill(self) -> None:
        """SIGKILL, and wait until the process is gone."""
        if self.proc is None:
            return
        code, _ = await stop(self.proc, self.config, signal.SIGKILL)
        if code != -signal.SIGKILL:
            raise AssertionError(f"the bridge exited with {code} before it was killed")

    async def terminate(self) -> int:
        """SIGTERM (a clean shutdown); returns the exit code."""
        if self.proc is None:
            return 0
        code, _ = await stop(self.proc, self.config, signal.SIGTERM)
        return code

    async def metrics(self) -> str:
        try:
            async with asyncio.timeout(10):
                status, text = await get(f"{self.base}/metrics")
        except (OSError, TimeoutError, aiohttp.ClientError) as error:
            code = None if self.proc is None else self.proc.returncode
            raise AssertionError(
                f"/metrics failed ({error!r}); exit code {code}; the bridge's output ends:\n"
                + self.output()[-6000:]
            ) from error
        if status != 200:
            raise AssertionError(f"/metrics answered {status}")
        return text

    def rss_mib(self) -> float:
        """Resident set size of the bridge process, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError(f"no VmRSS for pid {self.pid}")


def new_bridge(
    tmp_path: Path,
    settings: KafkaSettings,
    vinter: VinterSim,
    kaiko: KaikoSim,
    *,
    nav: list[str],
    daily: list[str],
    kafka: Mapping[str, Any] | None = None,
    settlement: Mapping[str, Any] | None = None,
) -> BridgeProcess:
    ops_port = free_port()
    config = fault_config(
        tmp_path,
        settings,
        vinter,
        kaiko,
        ops_port,
        nav=nav,
        daily=daily,
        kafka=kafka,
        settlement=settlement,
    )
    return BridgeProcess(config, ops_port)


@contextlib.asynccontextmanager
async def running(bridge: BridgeProcess) -> AsyncIterator[BridgeProcess]:
    """Start the bridge; on the way out stop it (SIGTERM, SIGKILL if it hangs)."""
    await bridge.start()
    try:
        yield bridge
    finally:
        if bridge.proc is not None and bridge.proc.returncode is None:
            await bridge.terminate()


# -- a paced load ----------------------------------------------------------------------------


@dataclass
class PacedLoad:
    """Appends NAV records to the simulator at `rate` per second, spread evenly over
    `symbols` (round robin), in ticks of `tick_s`; `sent` and `seconds` say how much and for
    how long (a load may run in several bursts)."""

    vinter: VinterSim
    symbols: Sequence[str]
    rate: float
    tick_s: float = 0.02
    sent: int = 0
    seconds: float = 0.0
    _progress: asyncio.Event = field(default_factory=asyncio.Event)

    async def send(self, count: int) -> None:
        """Send `count` more records at `rate`; returns when they are all appended."""
        loop = asyncio.get_running_loop()
        began, first, symbols = loop.time(), self.sent, self.symbols
        try:
            while self.sent < first + count:
                due = first + min(count, int((loop.time() - began) * self.rate))
                for i in range(self.sent, due):
                    self.vinter.append(symbols[i % len(symbols)])
                if due > self.sent:
                    self.sent = due
                    self._progress.set()
                await asyncio.sleep(self.tick_s)  # pacing: this is the load's clock
        finally:  # a load cancelled at the end still says how long it ran
            self.seconds += loop.time() - began

    async def reached(self, count: int, timeout: float) -> None:
        """Wait until `count` records have been sent in all."""
        async with asyncio.timeout(timeout):
            while self.sent < count:
                self._progress.clear()
                await self._progress.wait()


# -- the cluster's view of a topic -----------------------------------------------------------


@dataclass(frozen=True)
class PartitionState:
    partition: int
    leader: int
    replicas: tuple[int, ...]
    isr: tuple[int, ...]


def up_nodes(cluster: LocalKafkaCluster) -> list[LocalKafka]:
    return [node for node in cluster.nodes if node.running and not node.paused]


async def _metadata(node: LocalKafka, topics: list[str]) -> dict[tuple[str, int], PartitionState]:
    client = AIOKafkaClient(bootstrap_servers=node.bootstrap, request_timeout_ms=5000)
    try:
        async with asyncio.timeout(METADATA_TIMEOUT_S):
            await client.bootstrap()
            response = await client.send(node.node_id, MetadataRequest(topics))
    finally:
        await client.close()
    found: dict[tuple[str, int], PartitionState] = {}
    for error, name, *_, parts in response.topics:
        if error != 0:
            raise AssertionError(f"node {node.node_id}: error {error} for topic {name}")
        for part in parts:
            found[(name, part[1])] = PartitionState(
                part[1], part[2], tuple(part[3]), tuple(part[4])
            )
    return found


async def partitions(
    cluster: LocalKafkaCluster, topics: Iterable[str]
) -> dict[tuple[str, int], PartitionState]:
    """Leader, replicas and ISR of every partition of `topics`, as the first running,
    unpaused node to answer reports them (each is asked directly: a paused node would not
    answer, and a client left to choose might pick it)."""
    wanted = list(topics)
    failures: list[str] = []
    for node in up_nodes(cluster):
        try:
            return await _metadata(node, wanted)
        except Exception as exc:  # any failure: ask the next node, report them all
            failures.append(f"node {node.node_id}: {exc!r}")
    raise AssertionError(f"no running node answered a Metadata request: {failures}")


async def leader_of(cluster: LocalKafkaCluster, topic: str, partition: int) -> LocalKafka:
    """The node leading `topic`/`partition` now."""
    state = (await partitions(cluster, [topic]))[(topic, partition)]
    for node in cluster.nodes:
        if node.node_id == state.leader:
            return node
    raise AssertionError(f"{topic}/{partition} has no leader ({state})")


async def wait_in_sync(
    cluster: LocalKafkaCluster, topics: Iterable[str], timeout: float = 60.0
) -> float:
    """Wait until every partition of `topics` has a leader and all its replicas in sync;
    returns how long that took."""
    wanted = list(topics)
    began = time.monotonic()
    last: object = None
    while True:
        with contextlib.suppress(AssertionError):
            last = states = await partitions(cluster, wanted)
            if states and all(
                s.leader >= 0 and set(s.isr) == set(s.replicas) for s in states.values()
            ):
                return time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"replicas not in sync after {timeout:.0f}s: {last}")
        await asyncio.sleep(0.25)


def partition_of(settings: KafkaSettings, key: str) -> int:
    """The partition the default partitioner (murmur2) gives `key` on a bridge topic."""
    from aiokafka.partitioner import murmur2

    return int((murmur2(key.encode()) & 0x7FFFFFFF) % settings.partitions)


# -- secrets ---------------------------------------------------------------------------------


def secret_hits(texts: Mapping[str, str | bytes]) -> dict[str, int]:
    """How often each sentinel secret occurs in each named text (only non-zero counts)."""
    hits: dict[str, int] = {}
    for where, text in texts.items():
        data = text.encode() if isinstance(text, str) else text
        for secret in SECRETS:
            count = data.count(secret.encode())
            if count:
                hits[f"{where}: {secret[:8]}…"] = count
    return hits


# -- what the bridge says about itself -------------------------------------------------------


def counter(text: str, name: str, **labels: str) -> float:
    """The sum of a counter family's `_total` samples in /metrics text (those matching
    `labels`); 0 when it has none."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == name:
            for sample in family.samples:
                if sample.name.endswith("_total") and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
    return total


def lost_at_exit(output: str) -> int:
    """The `lost` count of the bridge's last words after SIGTERM; -1 if it said none."""
    found = re.findall(
        r"stopped: \d+ events acknowledged by Kafka, \d+ dead letters, (\d+) lost", output
    )
    return int(found[-1]) if found else -1


def backfilled(output: str) -> int:
    """NAV records the bridge's logs say it back-filled over REST, all runs together."""
    return sum(int(n) for n in re.findall(r"back-filled (\d+) records from REST", output))


# -- the end of a scenario ---------------------------------------------------------------------


@dataclass
class Ending:
    """What Kafka held while the bridge still ran (`running`) and after a clean stop
    (`final`), with the bridge's last /metrics, exit code and whole output."""

    running: Verdict
    final: Verdict
    metrics: str
    code: int
    output: str

    def assert_clean(self) -> None:
        """What every scenario must end with: a clean exit that lost nothing, everything
        sent in Kafka once and in order, and no secret anywhere (looked for at DEBUG)."""
        assert self.code == 0, self.output[-3000:]
        assert lost_at_exit(self.output) == 0, self.output[-3000:]
        assert '"level":"DEBUG"' in self.output
        assert self.running.complete, self.running.summary()
        assert not self.final.failures(), self.final.summary()
        hits = secret_hits(
            {**self.final.raw(), "/metrics": self.metrics, "bridge log": self.output}
        )
        assert not hits, f"secrets leaked: {hits}"


async def settle(
    bridge: BridgeProcess,
    settings: KafkaSettings,
    vinter: VinterSim,
    kaiko: KaikoSim,
    *,
    since_ms: int,
    timeout: float = 90.0,
) -> Ending:
    """Once the NAV load is done: stall the VWAP stream, check Kafka against everything the
    simulators sent (NAV, VWAP, settlements from `since_ms`) while the bridge runs, stop it
    with SIGTERM, and check again (nothing more may come with the shutdown)."""
    kaiko.stall()
    compare = against_simulators(settings, vinter, kaiko, nav=NAV, daily=DAILY, since_ms=since_ms)
    running = await compare(timeout=timeout)
    metrics = await bridge.metrics()
    code = await bridge.terminate()
    final = await compare(timeout=30)
    return Ending(running, final, metrics, code, bridge.output())
