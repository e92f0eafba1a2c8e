"""Publisher throughput against raw aiokafka, in one run on one broker.

    python bench/publish.py [--events 50000] [--bootstrap HOST:PORT]

Baseline: raw aiokafka `send()` of pre-serialized bytes, futures gathered (the fastest way
to use the same client). Measured: the Publisher doing the whole job per event from an
upstream record (normalize, build the envelope, serialize, send, account for the ack; the
normalizer's events are `verified`, so the schema check is not repeated). Both use the
same producer settings (acks=all, idempotent, lz4, linger 5 ms). Then the same job through
transactional shard publishers (1, and 12 with the symbols spread by shard), against the
idempotent Publisher. Prints events/s, the ratios, CPU seconds per 1,000 events and peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchlib import bench_settings, cpu_s, finish, kafka, peak_rss_mb, raw_aiokafka, scenario

from bridge.config import KafkaSettings
from bridge.kafka import ensure_topics
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.publish import Publisher
from bridge.publish.transactional import ShardPublisher
from bridge.shards import shard_of

SYMBOLS = [f"vnfa-b{i:03d}-r" for i in range(50)]
T0 = 1_700_000_000_000
SHARDS = 12


def records(n: int) -> list[dict[str, Any]]:
    return [
        {
            "id": i + 1,
            "symbol": SYMBOLS[i % len(SYMBOLS)],
            "created_at": "2023-11-14T22:13:20.000Z",
            "value": 100.0 + i / 1000,
            "timestamp": T0 + i,
            "date": "2023-11-14",
        }
        for i in range(n)
    ]


async def publisher(settings: KafkaSettings, upstream: list[dict[str, Any]]) -> tuple[float, float]:
    """Events/s and CPU seconds per 1,000 events of the Publisher doing the whole job."""
    async with Publisher(settings) as pub:
        start, cpu0 = time.perf_counter(), cpu_s()
        for record in upstream:
            await pub.publish(nav_tick(record, source=SOURCE_WS), received_at=time.monotonic())
        await pub.flush()
        elapsed, cpu = time.perf_counter() - start, cpu_s() - cpu0
        if pub.published != len(upstream):
            raise SystemExit(f"published {pub.published} of {len(upstream)}")
        return len(upstream) / elapsed, cpu / len(upstream) * 1000


async def shards(
    settings: KafkaSettings, upstream: list[dict[str, Any]], count: int
) -> tuple[float, float]:
    """Events/s and CPU seconds per 1,000 events of `count` transactional shard publishers,
    each symbol's events through the shard that holds it."""
    async with Publisher(settings) as dead:
        prefix = f"bench-{id(upstream)}-{time.monotonic_ns()}"
        pubs = [ShardPublisher(settings, f"{prefix}-{n}", dead=dead) for n in range(count)]
        await asyncio.gather(*(pub.start() for pub in pubs))
        of = {s: pubs[shard_of(s, count)] for s in SYMBOLS}
        start, cpu0 = time.perf_counter(), cpu_s()
        for record in upstream:
            await of[record["symbol"]].publish(
                nav_tick(record, source=SOURCE_WS), received_at=time.monotonic()
            )
        await asyncio.gather(*(pub.flush() for pub in pubs))
        elapsed, cpu = time.perf_counter() - start, cpu_s() - cpu0
        await asyncio.gather(*(pub.close() for pub in pubs))
        return len(upstream) / elapsed, cpu / len(upstream) * 1000


async def main_async(bootstrap: str, n: int, rounds: int) -> dict[str, Any]:
    settings = bench_settings(bootstrap)
    await ensure_topics(settings)
    upstream = records(n)
    payloads = [(r["symbol"].encode(), nav_tick(r, source=SOURCE_WS).to_json()) for r in upstream]
    await raw_aiokafka(settings, payloads[: n // 10])  # warm-up: connections, JIT of the broker
    raw, pub, one, many = [], [], [], []
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits all alike
        raw.append(await raw_aiokafka(settings, payloads))
        pub.append(await publisher(settings, upstream))
        one.append(await shards(settings, upstream, 1))
        many.append(await shards(settings, upstream, SHARDS))
    best_raw, (best_pub, cpu) = max(raw), max(pub)
    (best_one, cpu_one), (best_many, cpu_many) = max(one), max(many)
    return {
        "events": n,
        "raw_aiokafka_events_per_s": best_raw,
        "publisher_events_per_s": best_pub,
        "publisher_cpu_s_per_1k": cpu,
        "one_shard_events_per_s": best_one,
        "one_shard_cpu_s_per_1k": cpu_one,
        "shards_events_per_s": best_many,
        "shards_cpu_s_per_1k": cpu_many,
        "peak_rss_mb": peak_rss_mb(),
    }


def scenarios(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The run as report rows (see `benchlib.scenario`)."""
    return [
        scenario(
            "Publisher alone (normalize, serialize, send)",
            events_per_s=r["publisher_events_per_s"],
            baselines={"raw aiokafka": r["raw_aiokafka_events_per_s"]},
            cpu_s_per_1k=r["publisher_cpu_s_per_1k"],
            peak_rss_mb=r["peak_rss_mb"],
        ),
        scenario(
            "1 transactional shard publisher",
            events_per_s=r["one_shard_events_per_s"],
            baselines={"idempotent Publisher": r["publisher_events_per_s"]},
            cpu_s_per_1k=r["one_shard_cpu_s_per_1k"],
        ),
        scenario(
            f"{SHARDS} transactional shard publishers",
            events_per_s=r["shards_events_per_s"],
            baselines={"idempotent Publisher": r["publisher_events_per_s"]},
            cpu_s_per_1k=r["shards_cpu_s_per_1k"],
        ),
    ]


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
