"""Settlement poller: seconds for one full poll of 1,000 daily symbols against the simulator.

    python bench/settlement.py [--symbols 1000] [--days 30] [--bootstrap HOST:PORT]

The Vinter simulator runs in its own process (as the vendor would be), the poller in this
one, against a real broker (a local one is started unless `--bootstrap` is given). Timed:
the start (producer + checkpoint read), the first poll (backfill: `--days` settlements per
symbol in one transaction), a steady-state poll with nothing new, and a steady-state poll
in which every symbol has a new official close (and every tenth a corrected one). Target:
every poll under 10 s. In the same run, its baselines: the REST fetch of the same ranges
alone (receive stage; same concurrency), and raw aiokafka `send()` of as many pre-serialized
records. Also the CPU seconds per 1,000 settlements and the peak RSS of the first poll.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import orjson
from benchlib import (
    SIM_KEY_ENV,
    bench_settings,
    cpu_s,
    finish,
    kafka,
    peak_rss_mb,
    raw_aiokafka,
    reset_peak_rss,
    scenario,
    target,
    upstream,
)
from pydantic import SecretStr

from bridge.config import SettlementSettings
from bridge.kafka import ensure_topics
from bridge.sources.settlement import CONCURRENCY, SettlementPoller
from bridge.sources.vinter_rest import VinterRest

TARGET_S = 10.0


def symbol_names(n: int) -> list[str]:
    return [f"vnfa-b{i:04d}-d" for i in range(n)]


# -- the simulator process -------------------------------------------------------------------


async def serve_sim(n: int, days: int) -> None:
    """Run the simulator; print its URL; on stdin `append` add a close to every symbol and
    correct every tenth symbol's previous one, answering `ok`; stop at end of input."""
    from bridgedev.sim.vinter import VinterSim

    api_key = os.environ[SIM_KEY_ENV]
    names = symbol_names(n)
    token = secrets.token_urlsafe(16)  # the WebSocket side is not used here
    async with VinterSim(names, token=token, api_key=api_key, history_days=days) as sim:
        sys.stdout.write(sim.base_url + "\n")
        sys.stdout.flush()
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            if line.strip() == "append":
                for i, symbol in enumerate(names):
                    if i % 10 == 0:
                        last = sim.history(symbol)[-1]
                        sim.correct(symbol, last["date"], close=round(last["close"] * 1.01, 2))
                    sim.append(symbol)
            sys.stdout.write("ok\n")
            sys.stdout.flush()


class SimProcess:
    def __init__(self, n: int, days: int) -> None:
        self.api_key = secrets.token_urlsafe(16)
        self._args = [str(Path(__file__).resolve()), "--serve-sim", "--symbols", str(n)]
        self._args += ["--days", str(days)]
        self._proc: asyncio.subprocess.Process | None = None
        self.base_url = ""

    async def __aenter__(self) -> SimProcess:
        self._proc = await asyncio.create_subprocess_exec(
            *upstream([sys.executable, *self._args]),
            env={**os.environ, SIM_KEY_ENV: self.api_key},
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        self.base_url = (await self._line()).strip()
        return self

    async def _line(self) -> str:
        if self._proc is None or self._proc.stdout is None:
            raise RuntimeError("the simulator process is not running")
        line = await asyncio.wait_for(self._proc.stdout.readline(), timeout=120)
        if not line:
            raise SystemExit("the simulator process ended")
        return line.decode()

    async def command(self, text: str) -> None:
        if self._proc is None or self._proc.stdin is None:
            raise RuntimeError("the simulator process is not running")
        self._proc.stdin.write(text.encode() + b"\n")
        await self._proc.stdin.drain()
        await self._line()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._proc is None:
            return
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            await asyncio.wait_for(self._proc.wait(), timeout=10)
        except TimeoutError:
            self._proc.kill()
            await self._proc.wait()


# -- the baselines ---------------------------------------------------------------------------


async def fetch_alone(rest: VinterRest, names: list[str], days: int) -> list[tuple[bytes, bytes]]:
    """The receive stage alone: every symbol's back-fill range, `CONCURRENCY` at a time."""
    end_ms = int(time.time() * 1000)
    start_ms = end_ms - (days + 1) * 86_400_000
    queue = iter(names)
    found: list[tuple[bytes, bytes]] = []

    async def worker() -> None:
        for symbol in queue:
            records = await rest.records("daily", symbol, start_ms=start_ms, end_ms=end_ms)
            found.extend((symbol.encode(), orjson.dumps(r)) for r in records)

    async with asyncio.TaskGroup() as group:
        for _ in range(CONCURRENCY):
            group.create_task(worker())
    return found


# -- the poller ------------------------------------------------------------------------------


async def main_async(bootstrap: str, n: int, days: int) -> dict[str, Any]:
    kafka = bench_settings(bootstrap)
    settings = SettlementSettings(
        symbols=symbol_names(n),
        backfill_days=days,
        transactional_id=f"bench-settle-{uuid.uuid4().hex[:8]}",
    )
    result: dict[str, Any] = {"symbols": n, "days": days}
    async with SimProcess(n, days) as sim, VinterRest(sim.base_url, SecretStr(sim.api_key)) as rest:
        began = time.perf_counter()
        payloads = await fetch_alone(rest, symbol_names(n), days)
        result["fetch_alone_records_per_s"] = len(payloads) / (time.perf_counter() - began)
        raw = bench_settings(bootstrap)
        await ensure_topics(raw)
        await raw_aiokafka(raw, payloads[: len(payloads) // 10])  # warm-up
        result["raw_aiokafka_events_per_s"] = await raw_aiokafka(raw, payloads)
        del payloads
        poller = SettlementPoller(settings, kafka, rest)
        began = time.perf_counter()
        await poller.start()
        result["start_s"] = round(time.perf_counter() - began, 3)
        try:
            reset_peak_rss()
            cpu0 = cpu_s()
            first = await poller.poll()
            result["first_poll_cpu_s"] = cpu_s() - cpu0
            result["first_poll_peak_rss_mb"] = peak_rss_mb()
            idle = await poller.poll()
            await sim.command("append")
            steady = await poller.poll()
        finally:
            await poller.close()
    if first.settlements != n * days or idle.settlements or steady.settlements != n + n // 10:
        raise SystemExit(f"unexpected counts: {first}, {idle}, {steady}")
    result |= {
        "first_poll_s": round(first.seconds, 3),
        "first_poll_settlements": first.settlements,
        "idle_poll_s": round(idle.seconds, 3),
        "steady_poll_s": round(steady.seconds, 3),
        "steady_poll_settlements": steady.settlements,
        "steady_poll_revisions": steady.revisions,
    }
    result["within_target"] = max(first.seconds, idle.seconds, steady.seconds) < TARGET_S
    return result


def scenarios(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The run as report rows (see `benchlib.scenario`), with the budget's targets."""
    n, first = r["symbols"], r["first_poll_settlements"]
    slowest = max(r["first_poll_s"], r["idle_poll_s"], r["steady_poll_s"])
    return [
        scenario(
            f"Settlement poll, {n:,} symbols (first: back-fill)",
            events_per_s=first / r["first_poll_s"],
            baselines={
                "raw aiokafka": r["raw_aiokafka_events_per_s"],
                "receive alone": r["fetch_alone_records_per_s"],
            },
            cpu_s_per_1k=r["first_poll_cpu_s"] / first * 1000,
            peak_rss_mb=r["first_poll_peak_rss_mb"],
            targets=[target("slowest poll, s", slowest, TARGET_S, at_least=False)],
            details={
                k: r[k] for k in ("start_s", "first_poll_s", "idle_poll_s", "steady_poll_s", "days")
            },
        ),
        scenario("  baseline: REST fetch alone", events_per_s=r["fetch_alone_records_per_s"]),
        scenario("  baseline: raw aiokafka send()", events_per_s=r["raw_aiokafka_events_per_s"]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--json", help="also write the result to this file")
    parser.add_argument("--serve-sim", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sim:
        asyncio.run(serve_sim(args.symbols, args.days))
        return
    with kafka(args.bootstrap) as bootstrap:
        result = asyncio.run(main_async(bootstrap, args.symbols, args.days))
    finish(scenarios(result), result, args.json)


if __name__ == "__main__":
    main()
