"""What the benchmarks share: topics of their own, the raw aiokafka baseline, and the
process measurements every report column needs (CPU seconds, RSS, latency quantiles)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import resource
import statistics
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from bridge.config import KafkaSettings, Topics
from bridge.kafka import producer_kwargs

#: Where a simulator child finds its WebSocket token and API key: in argv they would be on
#: show to every process, and argparse would take a value starting with "-" for an option.
SIM_TOKEN_ENV = "BENCH_SIM_TOKEN"  # noqa: S105 - the name of a variable, not a secret
SIM_KEY_ENV = "BENCH_SIM_KEY"
#: The simulators stand in for remote servers, which never compete with the bridge for CPU.
#: On two shared cores a simulator at equal priority waits behind the processes it feeds, and
#: gRPC's per-message hand-offs turn each wait into a gap in the stream: measured with the
#: Kaiko simulator, the VWAP source then ran at 11-17k events/s against 16-25k with the
#: simulator raised, and the naive pipeline at 5.8-6.1k against 5.2-5.5k.
SIM_NICE = -10


def upstream(argv: list[str]) -> list[str]:
    """`argv` run as a simulator: raised to `SIM_NICE` (every thread it starts inherits it).
    Without the privilege, nice(1) says so and runs it at normal priority."""
    return ["nice", "-n", str(SIM_NICE), *argv]


@contextlib.contextmanager
def kafka(bootstrap: str | None) -> Iterator[str]:
    """`bootstrap` if given, else a local broker for the duration (jars fetched once)."""
    if bootstrap:
        yield bootstrap
        return
    from bridgedev.localkafka import LocalKafka, fetch

    fetch(quiet=True)
    with LocalKafka() as broker:
        yield broker.bootstrap


def bench_settings(bootstrap: str) -> KafkaSettings:
    """Kafka settings with topics no other run uses."""
    return KafkaSettings(
        bootstrap_servers=bootstrap,
        partitions=6,
        topics=Topics.prefixed(f"bench-{uuid.uuid4().hex[:8]}"),
    )


async def raw_aiokafka(settings: KafkaSettings, payloads: list[tuple[bytes, bytes]]) -> float:
    """Events/s of aiokafka's own `send()` of pre-serialized bytes, futures gathered: the
    baseline, with the bridge's producer settings (acks=all, idempotent, lz4)."""
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    try:
        topic = settings.topics.nav_ticks
        start = time.perf_counter()
        futures = [await producer.send(topic, value, key=key) for key, value in payloads]
        await asyncio.gather(*futures)
        return len(payloads) / (time.perf_counter() - start)
    finally:
        await producer.stop()


async def raw_paced(
    settings: KafkaSettings, payloads: list[tuple[bytes, bytes]], per_s: float, seconds: float
) -> dict[str, float]:
    """raw aiokafka `send()` -> ack latency at a paced rate: the floor the broker and the
    machine allow under a scenario's own receive -> ack latency. Keys are `raw_p50_ms`..."""
    producer = AIOKafkaProducer(**producer_kwargs(settings))
    await producer.start()
    latencies: list[float] = []
    pending: list[asyncio.Future[Any]] = []

    def acked(sent: float, future: asyncio.Future[Any]) -> None:
        latencies.append(time.monotonic() - sent)

    ticks0 = cpu_ticks()
    try:
        topic = settings.topics.nav_ticks
        tick = 0.005  # bursts every 5 ms, as the simulators emit
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
    summary = latency_ms(latencies[int(per_s) :])  # the first second is warm-up
    summary["steal_pct"] = steal_pct(ticks0)
    return {f"raw_{name}": value for name, value in summary.items()}


def cpu_ticks() -> tuple[int, int]:
    """(all, stolen) CPU ticks of the whole machine so far, from /proc/stat."""
    with open("/proc/stat", encoding="ascii") as stat:
        # user nice system idle iowait irq softirq steal (guest time is inside user)
        fields = [int(value) for value in stat.readline().split()[1:9]]
    return sum(fields), fields[7]


def steal_pct(since: tuple[int, int]) -> float:
    """The % of the machine's CPU time since `since` (a `cpu_ticks()`) that the hypervisor
    gave to other guests: on a shared host, what a latency tail may owe to its neighbours."""
    total, stolen = cpu_ticks()
    return 100 * (stolen - since[1]) / max(1, total - since[0])


def least_disturbed(rounds: list[dict[str, Any]], prefix: str = "") -> dict[str, Any]:
    """Of a few latency rounds, the one the host disturbed least (steal, whole percent),
    then the lowest p99: a tail on a shared host owes much to its neighbours' moments."""
    return min(rounds, key=lambda r: (round(r[f"{prefix}steal_pct"]), r[f"{prefix}p99_ms"]))


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (None once the process is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
            return stat.read().rpartition(")")[2].split()
    except OSError:
        return None


def children() -> list[int]:
    """Live child processes of this one (the VWAP source's gRPC receiver, for example)."""
    me = str(os.getpid())
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (fields := _stat(entry.name)) and fields[1] == me:
            found.append(int(entry.name))
    return found


def _child_cpu_s(pid: int) -> float:
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") if fields else 0.0


def _live(pids: Iterable[int | None]) -> list[int]:
    return [pid for pid in pids if pid is not None]


def cpu_s(pids: Iterable[int | None] = ()) -> float:
    """CPU seconds (user + system) of this process so far, all threads, plus those of the
    given processes, e.g. `children()` (for a window in which they live throughout)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    own = usage.ru_utime + usage.ru_stime
    return own + sum(map(_child_cpu_s, _live(pids)))


def _status_mb(field: str, pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def rss_mb(pids: Iterable[int | None] = ()) -> float:
    """Resident memory of this process now, plus that of the given processes."""
    return _status_mb("VmRSS:") + sum(_status_mb("VmRSS:", pid) for pid in _live(pids))


def peak_rss_mb(pids: Iterable[int | None] = ()) -> float:
    """Highest resident memory of this process since start (or `reset_peak_rss`), plus
    that of the given processes."""
    return _status_mb("VmHWM:") + sum(_status_mb("VmHWM:", pid) for pid in _live(pids))


def reset_peak_rss(pids: Iterable[int | None] = ()) -> None:
    """Start a new peak-RSS window for this process and the given ones, so one phase of a
    run is measured on its own."""
    for pid in ("self", *_live(pids)):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")


class Samples:
    """Stands in for `bridge.metrics.LATENCY` while a scenario runs: keeps every receive->ack
    observation (and still files it in `histogram`, when one is given)."""

    def __init__(self, histogram: Any = None) -> None:
        self.histogram = histogram
        self.values: list[float] = []

    def observe_since(self, now: float, starts: Iterable[float | None]) -> None:
        starts = list(starts)
        self.values.extend(now - start for start in starts if start is not None)
        if self.histogram is not None:
            self.histogram.observe_since(now, starts)


def latency_ms(samples: Sequence[float]) -> dict[str, float]:
    """p50 / p99 / max of latencies given in seconds, in milliseconds."""
    ordered = sorted(samples)
    quantiles = statistics.quantiles(ordered, n=100, method="inclusive")
    return {
        "p50_ms": quantiles[49] * 1000,
        "p99_ms": quantiles[98] * 1000,
        "max_ms": ordered[-1] * 1000,
        "latency_samples": len(ordered),
    }


def write_json(path: str | None, result: dict[str, Any]) -> None:
    """Print the result as the last line of output, and write it to `path` if given."""
    text = json.dumps(result, sort_keys=True)
    print(text, flush=True)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")


# -- the report: every benchmark describes its results as scenarios ----------------------------

#: What a scenario's `latency` holds besides `paced_per_s`, as each benchmark's result names
#: them (with a prefix such as `raw_` for a baseline's).
LATENCY_KEYS = ("p50_ms", "p99_ms", "max_ms", "steal_pct")

#: Baselines, in the order of the table's ratio columns.
BASELINES = ("naive pipeline", "raw aiokafka", "receive alone", "idempotent Publisher")


def scenario(
    name: str,
    *,
    events_per_s: float | None = None,
    baselines: dict[str, float] | None = None,
    latency: dict[str, float] | None = None,
    cpu_s_per_1k: float | None = None,
    peak_rss_mb: float | None = None,
    targets: list[dict[str, Any]] | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the report. `baselines` are events/s measured in the same run; `latency`
    holds `paced_per_s`, `p50_ms`, `p99_ms`, `max_ms` and `steal_pct` (the host's steal
    meanwhile, see `steal_pct()`); `targets` come from `target()`."""
    ratios = {
        name: events_per_s / rate
        for name, rate in (baselines or {}).items()
        if events_per_s is not None and rate > 0
    }
    return {
        "name": name,
        "events_per_s": events_per_s,
        "baselines": baselines or {},
        "ratios": ratios,
        "latency": latency,
        "cpu_s_per_1k": cpu_s_per_1k,
        "peak_rss_mb": peak_rss_mb,
        "targets": targets or [],
        "details": details or {},
    }


def target(what: str, value: float, limit: float, *, at_least: bool) -> dict[str, Any]:
    """A budget line: `value` against `limit` (a floor when `at_least`, else a ceiling)."""
    met = value >= limit if at_least else value < limit
    return {"what": what, "value": value, "limit": limit, "at_least": at_least, "met": met}


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(scenarios: list[dict[str, Any]]) -> str:
    """The report as text: one line per scenario, then every target met or missed."""
    head = ("scenario", "events/s", *(f"x {b}" for b in BASELINES))
    head += ("p50 / p99 / max ms @ rate", "steal %", "CPU s/1k", "peak RSS MB")
    rows = [head]
    for s in scenarios:
        lat = s["latency"]
        latency = (
            "-"
            if not lat
            else f"{lat['p50_ms']:.1f} / {lat['p99_ms']:.1f} / {lat['max_ms']:.0f}"
            f" @ {lat['paced_per_s']:,.0f}/s"
        )
        rows.append(
            (
                s["name"],
                _num(s["events_per_s"], ",.0f"),
                *(_num(s["ratios"].get(b), ".2f") for b in BASELINES),
                latency,
                _num((lat or {}).get("steal_pct"), ".0f"),
                _num(s["cpu_s_per_1k"], ".3f"),
                _num(s["peak_rss_mb"], ".0f"),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for s in scenarios:
        for t in s["targets"]:
            sign = ">=" if t["at_least"] else "<"
            verdict = "met" if t["met"] else "MISSED"
            lines.append(
                f"  {verdict:<6} {s['name']}: {t['what']} = {t['value']:,.3g}"
                f" (target {sign} {t['limit']:,.3g})"
            )
    return "\n".join(lines)


def finish(scenarios: list[dict[str, Any]], raw: dict[str, Any], path: str | None) -> None:
    """Print the table and the JSON result (`{"scenarios": [...], "raw": {...}}`)."""
    print(table(scenarios))
    write_json(path, {"scenarios": scenarios, "raw": raw})
