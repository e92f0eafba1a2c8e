"""`kaiko-bridge topics`: the topics of a Kafka cluster, with their partitions and end offsets
(read_committed), so a user knows what `replay` can read."""

from __future__ import annotations

import argparse
import asyncio
from typing import IO

from aiokafka import TopicPartition

from bridge.config import KafkaSettings
from bridge.kafka import admin_client, short_consumer
from bridge.replay import add_kafka_arguments, kafka_settings, reachable


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_kafka_arguments(parser)
    parser.add_argument(
        "--all", action="store_true", help="Kafka's internal topics (__consumer_offsets...) too"
    )


async def listing(settings: KafkaSettings, *, internal: bool = False) -> list[str]:
    """One line per topic: its name, partitions, records to its end, and each partition's
    end offset."""
    async with admin_client(settings) as admin:
        names = sorted(n for n in await admin.list_topics() if internal or not n.startswith("__"))
        described = await admin.describe_topics(names) if names else []
    partitions = {
        topic["topic"]: sorted(p["partition"] for p in topic.get("partitions", []))
        for topic in described
    }
    tps = [TopicPartition(name, p) for name in names for p in partitions.get(name, [])]
    ends: dict[TopicPartition, int] = {}
    if tps:
        async with short_consumer(settings, isolation_level="read_committed") as consumer:
            ends = await consumer.end_offsets(tps)
    width = max((len(n) for n in names), default=5)
    lines = [f"{'topic':<{width}}  partitions  end offsets (sum: per partition)"]
    for name in names:
        offsets = [ends.get(TopicPartition(name, p), 0) for p in partitions.get(name, [])]
        each = " ".join(f"{p}:{o}" for p, o in zip(partitions.get(name, []), offsets, strict=True))
        lines.append(f"{name:<{width}}  {len(offsets):>10}  {sum(offsets)}: {each}")
    return lines


def run(args: argparse.Namespace, out: IO[str]) -> int:
    settings = kafka_settings(args)
    lines = asyncio.run(reachable(settings, listing(settings, internal=args.all)))
    out.write("\n".join(lines) + "\n")
    return 0
