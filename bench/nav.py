"""NAV WebSocket path: throughput against raw aiokafka, receive->ack latency, idle sockets.

    python bench/nav.py [--bootstrap HOST:PORT] [--symbols 4] [--e2e-events 200000]

In one run, on one broker (a local one is started unless `--bootstrap` is given):

(a) raw aiokafka: `send()` of pre-serialized NAV events, futures gathered (the ceiling of the
    Kafka client itself, same producer settings as the bridge: acks=all, idempotent, lz4).
(b) NAV end to end: VinterSim (its own process, `ws_batch` off: one record per message)
    -> NavSocketSource (parse, normalize, de-duplicate) -> Publisher (validate, serialize,
    send) -> Kafka ack; events/s counted on acks, from the first record received to the
    last ack. (b0) is the same simulator read by a bare websockets client that only counts
    messages: the most the simulator can send, so (b) can be judged against its upstream.
    (a), (b0) and (b) run in interleaved rounds; the best of each is kept.
(c) receive->ack latency (p50/p99) at a paced 3,000 events/s, from the Publisher's own
    `bridge.metrics.LATENCY` observations (wrapped to keep every sample). (c0) is raw
    aiokafka `send()`->ack at the same pace: the floor the broker and machine allow.
(d) 1,000 idle sockets (1,000 real-time symbols, no records): RSS and CPU% of the bridge
    process (a fresh one, so earlier phases do not count) over 10 s; the simulator runs in
    another process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaProducer
from benchlib import bench_settings, raw_aiokafka
from pydantic import SecretStr

from bridge import metrics
from bridge.app import run_loop
from bridge.backoff import Backoff
from bridge.config import KafkaSettings, VinterSettings
from bridge.kafka import ensure_topics, producer_kwargs
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.publish import Publisher
from bridge.sources.nav_ws import NavSocketSource
from bridge.sources.vinter_rest import VinterRest
from bridge.state import MarkBook
from bridge.supervisor import SourceState, keep_running

TOKEN_ENV = "BENCH_NAV_TOKEN"  # noqa: S105 - the name of a variable, not a secret
KEY_ENV = "BENCH_NAV_KEY"
T0 = 1_700_000_000_000


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def until(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(step)


# -- the simulator, in its own process -------------------------------------------------------


async def sim_child(symbols: list[str]) -> None:
    """Serve VinterSim; commands on stdin: `append N` (per symbol), `rate R`, `quit`."""
    from bridge.sim.vinter import VinterSim

    token, key = os.environ[TOKEN_ENV], os.environ[KEY_ENV]
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    async with VinterSim(symbols, token=token, api_key=key) as sim:
        print(json.dumps({"ws_url": sim.ws_url, "base_url": sim.base_url}), flush=True)
        while line := (await reader.readline()).decode().split():
            command, arg = line[0], line[1] if len(line) > 1 else "0"
            if command == "append":
                for symbol in symbols:  # all at once: records are made before any is sent
                    sim.append(symbol, int(arg))
            elif command == "rate":
                sim.rate = float(arg)
            elif command == "quit":
                break
            print("ok", flush=True)


class Sim:
    """The simulator child process, driven over its stdin."""

    def __init__(self, symbols: list[str], token: str, key: str) -> None:
        env = {**os.environ, TOKEN_ENV: token, KEY_ENV: key}
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--sim-child", ",".join(symbols)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        urls = json.loads(self._line())
        self.ws_url: str = urls["ws_url"]
        self.base_url: str = urls["base_url"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process ended")
        return line

    async def command(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()
        reply = await asyncio.to_thread(self._line)
        if reply.strip() != "ok":
            raise RuntimeError(f"simulator: {reply!r}")

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# -- (a) raw aiokafka --------------------------------------------------------------------------


def raw_payloads(symbols: list[str], n: int) -> list[tuple[bytes, bytes]]:
    """NAV events as the bridge would publish them, keyed and serialized in advance."""
    payloads = []
    for i in range(n):
        record = {
            "id": i + 1,
            "symbol": symbols[i % len(symbols)],
            "created_at": "2023-11-14T22:13:20.000Z",
            "value": 100.0 + i / 1000,
            "timestamp": T0 + i,
            "date": "2023-11-14",
        }
        payloads.append((record["symbol"].encode(), nav_tick(record, source=SOURCE_WS).to_json()))
    return payloads


async def raw_paced(
    settings: KafkaSettings, payloads: list[tuple[bytes, bytes]], per_s: float, seconds: float
) -> dict[str, float]:
    """(c0) raw aiokafka at a paced rate: send() -> ack latency, the floor under (c)."""
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    latencies: list[float] = []
    pending: list[asyncio.Future[Any]] = []

    def acked(sent: float, future: asyncio.Future[Any]) -> None:
        latencies.append(time.monotonic() - sent)

    try:
        topic = settings.topics.nav_ticks
        tick = 0.005  # bursts every 5 ms, as the simulator emits
        per_tick = per_s * tick
        started = time.monotonic()
        due, index, ticks = 0.0, 0, 0
        while time.monotonic() - started < seconds + 1:
            ticks += 1
            due += per_tick
            while due >= 1:
                due -= 1
                key, value = payloads[index % len(payloads)]
                index += 1
                future = await producer.send(topic, value, key=key)
                future.add_done_callback(functools.partial(acked, time.monotonic()))
                pending.append(future)
            await asyncio.sleep(max(0.0, started + ticks * tick - time.monotonic()))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    window = sorted(latencies[int(per_s) :])  # the first second is warm-up
    quantiles = statistics.quantiles(window, n=100)
    return {"raw_p50_ms": quantiles[49] * 1000, "raw_p99_ms": quantiles[98] * 1000}


# -- (b0) the simulator's own ceiling ------------------------------------------------------------


async def sim_ceiling(symbols: list[str], n: int) -> float:
    from websockets.asyncio.client import connect

    token, key = uuid.uuid4().hex, uuid.uuid4().hex
    sim = Sim(symbols, token, key)
    try:
        sockets = [
            await connect(f"{sim.ws_url}/ws/nav/{s}/?token={token}", compression=None)
            for s in symbols
        ]
        counts = [0] * len(symbols)
        first: list[float] = []

        async def count(i: int) -> None:
            ws = sockets[i]
            while counts[i] < n:
                await ws.recv(decode=False)
                if not first:
                    first.append(time.perf_counter())
                counts[i] += 1

        readers = [asyncio.create_task(count(i)) for i in range(len(symbols))]
        await sim.command(f"append {n}")
        await asyncio.gather(*readers)
        elapsed = time.perf_counter() - first[0]
        for ws in sockets:
            await ws.close()
        return n * len(symbols) / elapsed
    finally:
        sim.close()


# -- (b) and (c) NAV end to end, then latency at a paced rate --------------------------------------


class Samples:
    """Stands in for `metrics.LATENCY`: keeps every observation, forwards to the histogram."""

    def __init__(self, histogram: Any) -> None:
        self.histogram = histogram
        self.values: list[float] = []

    def observe(self, value: float) -> None:
        self.values.append(value)
        self.histogram.observe(value)


class Rig:
    """Simulator process -> one NavSocketSource per symbol -> Publisher -> Kafka."""

    def __init__(self, settings: KafkaSettings, symbols: list[str]) -> None:
        self.settings = settings
        self.symbols = symbols
        self.token, self.key = uuid.uuid4().hex, uuid.uuid4().hex
        self.stack = contextlib.AsyncExitStack()
        self.tasks: list[asyncio.Task[None]] = []
        self.sources: list[NavSocketSource] = []

    async def __aenter__(self) -> Rig:
        self.sim = Sim(self.symbols, self.token, self.key)
        self.stack.callback(self.sim.close)
        vinter = VinterSettings(
            ws_url=self.sim.ws_url,
            rest_url=self.sim.base_url,
            token=self.token,
            api_key=self.key,
            # A burst queues tens of thousands of messages ahead of a pong; with the default
            # 20 s the keepalive may close the socket mid-burst (then the session reconnects
            # and back-fills, which is correct, but it is not what (b) measures).
            ping_interval_s=60,
        )
        book = MarkBook(self.settings.topics.nav_ticks)
        rest = await self.stack.enter_async_context(
            VinterRest(self.sim.base_url, SecretStr(self.key))
        )
        self.publisher = await self.stack.enter_async_context(Publisher(self.settings))
        self.sources = [
            NavSocketSource(s, vinter, self.publisher, book, rest) for s in self.symbols
        ]
        states = [SourceState(s.name) for s in self.sources]
        self.tasks = [
            asyncio.create_task(keep_running(s, state=st, backoff=Backoff(initial=0.05)))
            for s, st in zip(self.sources, states, strict=True)
        ]
        await until(lambda: all(st.connected for st in states), timeout=30)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.stack.aclose()

    def received(self) -> int:
        return sum(s.received for s in self.sources)

    async def burst(self, n: int) -> float:
        """(b) `n` records per symbol as fast as the simulator sends; events/s on acks."""
        total = self.publisher.published + n * len(self.symbols)
        seen = self.received()
        appended = asyncio.create_task(self.sim.command(f"append {n}"))
        await until(lambda: self.received() > seen, timeout=60, step=0.001)
        start = time.perf_counter()
        await until(lambda: self.publisher.published >= total, timeout=300)
        rate = n * len(self.symbols) / (time.perf_counter() - start)
        await appended
        return rate

    async def paced(self, events_per_s: float, seconds: float) -> dict[str, float]:
        """(c) receive->ack latency with the simulator producing `events_per_s`."""
        samples = Samples(metrics.LATENCY)
        metrics.LATENCY = samples  # type: ignore[assignment]  # the bench's timing hook
        try:
            await self.sim.command(f"rate {events_per_s / len(self.symbols)}")
            await asyncio.sleep(2)  # warm-up at the paced rate
            samples.values.clear()
            acked = self.publisher.published
            await asyncio.sleep(seconds)
            rate = (self.publisher.published - acked) / seconds
            window = sorted(samples.values)
            await self.sim.command("rate 0")
        finally:
            metrics.LATENCY = samples.histogram
        quantiles = statistics.quantiles(window, n=100)
        return {
            "paced_events_per_s": rate,
            "latency_samples": len(window),
            "p50_ms": quantiles[49] * 1000,
            "p99_ms": quantiles[98] * 1000,
            "max_ms": window[-1] * 1000,
            "dropped": sum(s.duplicates + s.bad_records for s in self.sources),
        }


# -- (d) idle sockets, measured in a fresh bridge process ----------------------------------------


async def idle_child(
    bootstrap: str, ws_url: str, base_url: str, count: int, seconds: float
) -> None:
    token, key = os.environ[TOKEN_ENV], os.environ[KEY_ENV]
    settings = bench_settings(bootstrap)
    vinter = VinterSettings(ws_url=ws_url, rest_url=base_url, token=token, api_key=key)
    book = MarkBook(settings.topics.nav_ticks)
    async with VinterRest(base_url, SecretStr(key)) as rest, Publisher(settings) as publisher:
        before = rss_mb()
        symbols = [f"vnfa-i{i:04d}-r" for i in range(count)]
        sources = [NavSocketSource(s, vinter, publisher, book, rest) for s in symbols]
        states = [SourceState(s.name) for s in sources]
        started = time.perf_counter()
        tasks = [
            asyncio.create_task(keep_running(s, state=st, backoff=Backoff(initial=0.05)))
            for s, st in zip(sources, states, strict=True)
        ]
        await until(lambda: all(st.connected for st in states), timeout=60, step=0.05)
        connect_s = time.perf_counter() - started
        await asyncio.sleep(2)  # let the connect burst settle
        cpu0, wall0 = cpu_s(), time.perf_counter()
        await asyncio.sleep(seconds)
        cpu = (cpu_s() - cpu0) / (time.perf_counter() - wall0) * 100
        after = rss_mb()
        connected = sum(st.connected for st in states)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    result = {
        "sockets": connected,
        "connect_s": connect_s,
        "rss_before_mb": before,
        "rss_mb": after,
        "cpu_percent": cpu,
    }
    print(json.dumps(result), flush=True)


async def idle_sockets(bootstrap: str, count: int, seconds: float) -> dict[str, float]:
    token, key = uuid.uuid4().hex, uuid.uuid4().hex
    symbols = [f"vnfa-i{i:04d}-r" for i in range(count)]
    sim = Sim(symbols, token, key)
    try:
        env = {**os.environ, TOKEN_ENV: token, KEY_ENV: key}
        args = [sys.executable, __file__, "--idle-child", sim.ws_url, sim.base_url]
        args += ["--bootstrap", bootstrap, "--sockets", str(count), "--seconds", str(seconds)]
        done = await asyncio.to_thread(
            subprocess.run,  # our own script, fixed arguments
            args,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=True,
        )
        result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    finally:
        sim.close()


# -- the run -----------------------------------------------------------------------------------


async def main_async(args: argparse.Namespace, bootstrap: str) -> dict[str, Any]:
    settings = bench_settings(bootstrap)
    raw = bench_settings(bootstrap)  # a topic of its own
    await ensure_topics(settings)
    await ensure_topics(raw)
    symbols = [f"vnfa-b{i:02d}-r" for i in range(args.symbols)]
    per_symbol = args.e2e_events // args.symbols
    payloads = raw_payloads(symbols, args.events)
    await raw_aiokafka(raw, payloads[: len(payloads) // 10])  # warm-up
    result: dict[str, Any] = {"rounds": args.rounds}
    raws, e2es, ceilings = [], [], []
    async with Rig(settings, symbols) as rig:
        for _ in range(args.rounds):  # interleaved: drift on a shared machine hits all alike
            raws.append(await raw_aiokafka(raw, payloads))
            ceilings.append(await sim_ceiling(symbols, per_symbol))
            e2es.append(await rig.burst(per_symbol))
        result.update(await rig.paced(args.paced, args.seconds))
    result.update(await raw_paced(raw, payloads, args.paced, args.seconds))
    result["raw_aiokafka_events_per_s"] = max(raws)
    result["sim_ceiling_msgs_per_s"] = max(ceilings)
    result["e2e_events_per_s"] = max(e2es)
    result["ratio"] = max(e2es) / max(raws)
    result["median_ratio"] = statistics.median(e / r for e, r in zip(e2es, raws, strict=True))
    result.update(await idle_sockets(bootstrap, args.sockets, args.seconds))
    result["load_average"] = os.getloadavg()[0]
    return result


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    rows = [
        ("(a) raw aiokafka send(), pre-serialized", f"{r['raw_aiokafka_events_per_s']:,.0f} ev/s"),
        ("(b0) simulator -> bare websockets recv", f"{r['sim_ceiling_msgs_per_s']:,.0f} msg/s"),
        ("(b) NAV end to end, counted on acks", f"{r['e2e_events_per_s']:,.0f} ev/s"),
        (
            "    ratio (b)/(a)   [target >= 0.7]",
            f"{r['ratio']:.2f} best/best, {r['median_ratio']:.2f} median of {r['rounds']} rounds",
        ),
        (
            f"(c) receive->ack at {args.paced:,.0f}/s (got {r['paced_events_per_s']:,.0f}/s)",
            f"p50 {r['p50_ms']:.1f} ms  p99 {r['p99_ms']:.1f} ms  max {r['max_ms']:.1f} ms",
        ),
        ("    [target p99 <= 20 ms]", f"{r['latency_samples']:,} samples"),
        (
            "(c0) raw aiokafka send()->ack, same pace",
            f"p50 {r['raw_p50_ms']:.1f} ms  p99 {r['raw_p99_ms']:.1f} ms",
        ),
        (
            f"(d) {r['sockets']:,} idle sockets: RSS [< 300 MB]",
            f"{r['rss_mb']:.0f} MB (before sockets {r['rss_before_mb']:.0f} MB)",
        ),
        (f"    CPU over {args.seconds:g} s   [< 5 %]", f"{r['cpu_percent']:.2f} % of a core"),
        ("    time to connect them all", f"{r['connect_s']:.1f} s"),
        ("load average (1 min) at the end", f"{r['load_average']:.1f} on {os.cpu_count()} CPUs"),
    ]
    width = max(len(name) for name, _ in rows) + 2
    for name, value in rows:
        print(f"{name:<{width}}{value}")
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in r.items()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--events", type=int, default=100_000, help="(a) events")
    parser.add_argument("--e2e-events", type=int, default=200_000, help="(b) events")
    parser.add_argument("--symbols", type=int, default=4, help="(b)/(c) sockets")
    parser.add_argument("--paced", type=float, default=3000.0, help="(c) events/s")
    parser.add_argument("--seconds", type=float, default=10.0, help="(c)/(d) window")
    parser.add_argument("--sockets", type=int, default=1000, help="(d) idle sockets")
    parser.add_argument("--rounds", type=int, default=3, help="(a)/(b) rounds, best kept")
    parser.add_argument("--sim-child", help=argparse.SUPPRESS)
    parser.add_argument("--idle-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sim_child:
        run_loop(sim_child(args.sim_child.split(",")))
        return
    if args.idle_child:
        ws_url, base_url = args.idle_child
        run_loop(idle_child(args.bootstrap, ws_url, base_url, args.sockets, args.seconds))
        return
    if args.bootstrap:
        result = run_loop(main_async(args, args.bootstrap))
    else:
        from bridge.localkafka import LocalKafka, fetch

        fetch(quiet=True)
        with LocalKafka() as broker:
            result = run_loop(main_async(args, broker.bootstrap))
    report(result, args)


if __name__ == "__main__":
    main()
