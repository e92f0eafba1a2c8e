"""Publisher throughput against raw aiokafka, in one run on one broker.

    python bench/publish.py [--events 50000] [--bootstrap HOST:PORT]

Baseline: raw aiokafka `send()` of pre-serialized bytes, futures gathered (the fastest way
to use the same client). Measured: the Publisher doing the whole job per event (build the
envelope, validate against the schema, serialize, send, account for the ack). Both use the
same producer settings (acks=all, idempotent, lz4, linger 5 ms). Prints events/s and ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from benchlib import bench_settings, raw_aiokafka

from bridge.config import KafkaSettings
from bridge.kafka import ensure_topics
from bridge.normalize.nav import SOURCE_WS, nav_tick
from bridge.publish import Publisher

SYMBOLS = [f"vnfa-b{i:03d}-r" for i in range(50)]
T0 = 1_700_000_000_000


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


async def publisher(settings: KafkaSettings, upstream: list[dict[str, Any]]) -> float:
    async with Publisher(settings) as pub:
        start = time.perf_counter()
        for record in upstream:
            await pub.publish(nav_tick(record, source=SOURCE_WS), received_at=time.monotonic())
        await pub.flush()
        elapsed = time.perf_counter() - start
        if pub.published != len(upstream):
            raise SystemExit(f"published {pub.published} of {len(upstream)}")
        return len(upstream) / elapsed


async def main_async(bootstrap: str, n: int, rounds: int) -> dict[str, float]:
    settings = bench_settings(bootstrap)
    await ensure_topics(settings)
    upstream = records(n)
    payloads = [(r["symbol"].encode(), nav_tick(r, source=SOURCE_WS).to_json()) for r in upstream]
    await raw_aiokafka(settings, payloads[: n // 10])  # warm-up: connections, JIT of the broker
    raw, pub = [], []
    for _ in range(rounds):  # interleaved, so drift on a shared machine hits both alike
        raw.append(await raw_aiokafka(settings, payloads))
        pub.append(await publisher(settings, upstream))
    best_raw, best_pub = max(raw), max(pub)
    return {
        "events": n,
        "raw_aiokafka_events_per_s": round(best_raw),
        "publisher_events_per_s": round(best_pub),
        "ratio": round(best_pub / best_raw, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bootstrap", help="use this broker instead of starting one")
    args = parser.parse_args()
    if args.bootstrap:
        result = asyncio.run(main_async(args.bootstrap, args.events, args.rounds))
    else:
        from bridge.localkafka import LocalKafka, fetch

        fetch(quiet=True)
        with LocalKafka() as broker:
            result = asyncio.run(main_async(broker.bootstrap, args.events, args.rounds))
    print(f"{'stage':<34}{'events/s':>12}")
    print(f"{'raw aiokafka send() (baseline)':<34}{result['raw_aiokafka_events_per_s']:>12,}")
    print(f"{'Publisher (build+validate+send)':<34}{result['publisher_events_per_s']:>12,}")
    print(f"{'ratio':<34}{result['ratio']:>12}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
