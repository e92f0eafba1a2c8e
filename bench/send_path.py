"""The Publisher's own batcher against aiokafka's `send()` tuned, in interleaved rounds.

    python bench/send_path.py [--events 50000] [--rounds 3] [--bootstrap HOST:PORT]

Both send the same pre-serialized NAV events with their headers, acks=all, idempotent, lz4,
to the same 6-partition topic. aiokafka's `send()` runs with each `linger_ms` and
`max_batch_size` of a grid, a done-callback per event (what the bridge would need to account
for each acknowledgement), futures gathered at the end. The Publisher hands the same bytes
to `send()` and flushes. Prints events/s and CPU per 1,000 events for each, and the
Publisher's ratio over the best `send()` configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka import AIOKafkaProducer
from benchlib import bench_settings, cpu_s, finish, kafka, peak_rss_mb, scenario

from bridge.config import KafkaSettings
from bridge.events import Headers
from bridge.kafka import ensure_topics, producer_kwargs
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.publish import Publisher

SYMBOLS = [f"vnfa-b{i:03d}-r" for i in range(50)]
T0 = 1_700_000_000_000
LINGER_MS = (5, 20, 50)
BATCH_BYTES = (16_384, 65_536, 262_144)

Payload = tuple[str, bytes, Headers]


def payloads(n: int) -> list[Payload]:
    out = []
    for i in range(n):
        symbol = SYMBOLS[i % len(SYMBOLS)]
        record = {
            "id": i + 1,
            "symbol": symbol,
            "created_at": "2023-11-14T22:13:20.000Z",
            "value": 100.0 + i / 1000,
            "timestamp": T0 + i,
            "date": "2023-11-14",
        }
        event = nav_tick(record, source=SOURCE_WS)
        out.append((symbol, event.to_json(), event.headers()))
    return out


async def tuned_send(
    settings: KafkaSettings, events: list[Payload], linger_ms: int, batch_bytes: int
) -> tuple[float, float]:
    """Events/s and CPU s per 1,000 events of aiokafka's `send()`, one callback per event."""
    kwargs = {**producer_kwargs(settings), "linger_ms": linger_ms, "max_batch_size": batch_bytes}
    producer = AIOKafkaProducer(**kwargs)
    await producer.start()
    acked = 0

    def done(future: asyncio.Future[Any]) -> None:
        nonlocal acked
        if not future.cancelled() and future.exception() is None:
            acked += 1

    try:
        topic = settings.topics.nav_ticks
        start, cpu0 = time.perf_counter(), cpu_s()
        futures = []
        for key, value, headers in events:
            future = await producer.send(topic, value, key=key.encode(), headers=headers)
            future.add_done_callback(done)
            futures.append(future)
        await asyncio.gather(*futures)
        elapsed, cpu = time.perf_counter() - start, cpu_s() - cpu0
    finally:
        await producer.stop()
    if acked != len(events):
        raise SystemExit(f"send(): {acked} of {len(events)} acknowledged")
    return len(events) / elapsed, cpu / len(events) * 1000


async def batcher(settings: KafkaSettings, events: list[Payload]) -> tuple[float, float]:
    """Events/s and CPU s per 1,000 events of the Publisher's `send()` of the same bytes."""
    async with Publisher(settings) as pub:
        topic = settings.topics.nav_ticks
        start, cpu0 = time.perf_counter(), cpu_s()
        for key, value, headers in events:
            await pub.send(topic, key, value, headers)
        await pub.flush()
        elapsed, cpu = time.perf_counter() - start, cpu_s() - cpu0
        if pub.published != len(events):
            raise SystemExit(f"Publisher: {pub.published} of {len(events)} acknowledged")
    return len(events) / elapsed, cpu / len(events) * 1000


async def main_async(bootstrap: str, n: int, rounds: int) -> dict[str, Any]:
    settings = bench_settings(bootstrap)
    await ensure_topics(settings)
    events = payloads(n)
    grid = list(itertools.product(LINGER_MS, BATCH_BYTES))
    await tuned_send(settings, events[: n // 10], 5, 16_384)  # warm-up
    runs: dict[str, list[tuple[float, float]]] = {}
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        runs.setdefault("publisher", []).append(await batcher(settings, events))
        for linger_ms, batch_bytes in grid:
            name = f"send() linger_ms={linger_ms} max_batch_size={batch_bytes}"
            runs.setdefault(name, []).append(
                await tuned_send(settings, events, linger_ms, batch_bytes)
            )
    best = {name: max(results) for name, results in runs.items()}
    tuned = {name: rate for name, rate in best.items() if name != "publisher"}
    fastest = max(tuned, key=lambda name: tuned[name][0])
    return {
        "events": n,
        "rounds": rounds,
        "best": {name: {"events_per_s": r, "cpu_s_per_1k": c} for name, (r, c) in best.items()},
        "every_round": runs,
        "fastest_send": fastest,
        "publisher_over_fastest_send": best["publisher"][0] / tuned[fastest][0],
        "peak_rss_mb": peak_rss_mb(),
    }


def scenarios(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The run as report rows (see `benchlib.scenario`)."""
    best = r["best"]
    fastest = r["fastest_send"]
    rows = [
        scenario(
            "Publisher.send (its batcher), pre-serialized",
            events_per_s=best["publisher"]["events_per_s"],
            baselines={"best tuned send()": best[fastest]["events_per_s"]},
            cpu_s_per_1k=best["publisher"]["cpu_s_per_1k"],
            details={"fastest_send": fastest},
        )
    ]
    rows += [
        scenario(
            f"  aiokafka {name}",
            events_per_s=result["events_per_s"],
            cpu_s_per_1k=result["cpu_s_per_1k"],
        )
        for name, result in best.items()
        if name != "publisher"
    ]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    parser.add_argument("--json", help="also write the result to this file")
    args = parser.parse_args()
    with kafka(args.bootstrap) as bootstrap:
        result = asyncio.run(main_async(bootstrap, args.events, args.rounds))
    finish(scenarios(result), result, args.json)


if __name__ == "__main__":
    main()
