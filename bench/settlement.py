"""Settlement poller: seconds for one full poll of 1,000 daily symbols against the simulator.

    python bench/settlement.py [--symbols 1000] [--days 30] [--bootstrap HOST:PORT]

The Vinter simulator runs in its own process (as the vendor would be), the poller in this
one, against a real broker (a local one is started unless `--bootstrap` is given). Timed:
the start (producer + checkpoint read), the first poll (backfill: `--days` settlements per
symbol in one transaction), a steady-state poll with nothing new, and a steady-state poll
in which every symbol has a new official close (and every tenth a corrected one). Target:
every poll under 10 s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import bench_settings
from pydantic import SecretStr

from bridge.config import SettlementSettings
from bridge.sources.settlement import SettlementPoller
from bridge.sources.vinter_rest import VinterRest

TARGET_S = 10.0


def symbol_names(n: int) -> list[str]:
    return [f"vnfa-b{i:04d}-d" for i in range(n)]


# -- the simulator process -------------------------------------------------------------------


async def serve_sim(n: int, days: int, api_key: str) -> None:
    """Run the simulator; print its URL; on stdin `append` add a close to every symbol and
    correct every tenth symbol's previous one, answering `ok`; stop at end of input."""
    from bridge.sim.vinter import VinterSim

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
        self._args += ["--days", str(days), "--api-key", self.api_key]
        self._proc: asyncio.subprocess.Process | None = None
        self.base_url = ""

    async def __aenter__(self) -> SimProcess:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *self._args,
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
        poller = SettlementPoller(settings, kafka, rest)
        began = time.perf_counter()
        await poller.start()
        result["start_s"] = round(time.perf_counter() - began, 3)
        try:
            first = await poller.poll()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--serve-sim", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--api-key", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_sim:
        asyncio.run(serve_sim(args.symbols, args.days, args.api_key))
        return
    if args.bootstrap:
        result = asyncio.run(main_async(args.bootstrap, args.symbols, args.days))
    else:
        from bridge.localkafka import LocalKafka, fetch

        fetch(quiet=True)
        with LocalKafka() as broker:
            result = asyncio.run(main_async(broker.bootstrap, args.symbols, args.days))
    n = result["symbols"]
    print(f"{'stage':<52}{'seconds':>9}")
    print(f"{'start (producer, checkpoints)':<52}{result['start_s']:>9.2f}")
    first = f"first poll ({result['first_poll_settlements']:,} settlements, backfill)"
    print(f"{first:<52}{result['first_poll_s']:>9.2f}")
    print(f"{'steady poll, nothing new (' + str(n) + ' symbols)':<52}{result['idle_poll_s']:>9.2f}")
    steady = f"steady poll ({result['steady_poll_settlements']:,} settlements)"
    print(f"{steady:<52}{result['steady_poll_s']:>9.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
