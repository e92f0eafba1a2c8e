"""What the benchmarks share: topics of their own, and the raw aiokafka baseline."""

from __future__ import annotations

import asyncio
import time
import uuid

from aiokafka import AIOKafkaProducer

from bridge.config import KafkaSettings, Topics
from bridge.kafka import producer_kwargs


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
