"""`kaiko-bridge replay` against a real broker: by time, by offset, by key, to a file, to
stdout, to another topic, and 100k records byte for byte."""

from __future__ import annotations

import argparse
import asyncio
import io
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer, ConsumerRecord

from bridge.config import KafkaSettings
from bridge.replay import add_arguments, replay
from tests.conftest import NewTopic
from tests.kafkautil import read_topic
from tests.samples import nav_event

pytestmark = pytest.mark.integration

SYMBOLS = ["vnfa-btca-15-r", "vnfa-etha-10-r", "vnfa-sola-5-r", "vnfa-dota-3-r"]
T0 = 1_700_000_000_000
PER_SYMBOL = 25
WAIT_S = 60.0
# Records written with T0's timestamps (2023) would be deleted at the broker's next
# time-based retention check (every minute), in the middle of a test.
KEEP_OLD = {"retention.ms": "-1"}

Records = list[ConsumerRecord[bytes, bytes]]


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kaiko-bridge replay")
    add_arguments(parser)
    return parser.parse_args(list(argv))


async def run_replay(kafka_settings: KafkaSettings, *argv: str) -> bytes:
    """Replay to an in-memory stdout; the bytes written."""
    out = io.BytesIO()
    args = parse([*argv, "--bootstrap", kafka_settings.bootstrap_servers])
    async with asyncio.timeout(WAIT_S):
        assert await replay(args, stdout=out) == 0
    return out.getvalue()


async def produce_ticks(bootstrap: str, topic: str) -> Records:
    """PER_SYMBOL ticks per symbol with explicit Kafka timestamps; the records read back."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        sent = []
        for i in range(PER_SYMBOL):
            for symbol in SYMBOLS:
                event = nav_event(symbol, T0 + i * 1000, 100 + i)
                sent.append(
                    await producer.send(
                        topic,
                        event.to_json(),
                        key=event.key.encode(),
                        headers=event.headers(),
                        timestamp_ms=T0 + i * 1000,
                    )
                )
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    return await read_topic(bootstrap, topic, until=PER_SYMBOL * len(SYMBOLS))


def lines_by_key(data: bytes, records: Records) -> dict[bytes, list[bytes]]:
    """Output lines grouped by the key of the record they are the value of, in order."""
    key_of = {r.value: r.key for r in records}
    grouped: dict[bytes, list[bytes]] = defaultdict(list)
    for line in data.splitlines():
        grouped[key_of[line] or b""].append(line)
    return dict(grouped)


def expected_by_key(records: Iterable[ConsumerRecord[bytes, bytes]]) -> dict[bytes, list[bytes]]:
    grouped: dict[bytes, list[bytes]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        grouped[r.key or b""].append(r.value or b"")
    return dict(grouped)


async def test_replay_by_time_offset_and_key(
    kafka_settings: KafkaSettings, new_topic: NewTopic, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=3, config=KEEP_OLD)
    records = await produce_ticks(kafka_settings.bootstrap_servers, topic)
    everything = await run_replay(kafka_settings, topic)
    assert lines_by_key(everything, records) == expected_by_key(records)
    assert everything.endswith(b"\n")

    # from a time: exactly the records at or after it, in offset order per partition
    since = T0 + 10_000
    out = await run_replay(kafka_settings, topic, "--from-time", "2023-11-14T22:13:30Z")
    assert since == 1_700_000_010_000  # the ISO time above
    wanted = [r for r in records if r.timestamp >= since]
    assert sorted(out.splitlines()) == sorted(r.value for r in wanted)
    assert lines_by_key(out, records) == expected_by_key(wanted)

    # a time window [from, to), the bounds as Unix milliseconds
    out = await run_replay(
        kafka_settings, topic, "--from-time", str(since), "--to-time", str(T0 + 13_000)
    )
    wanted = [r for r in records if since <= r.timestamp < T0 + 13_000]
    assert lines_by_key(out, records) == expected_by_key(wanted)
    assert len(out.splitlines()) == 3 * len(SYMBOLS)

    # from an offset on every partition, and up to one
    out = await run_replay(kafka_settings, topic, "--from-offset", "7", "--to-offset", "30")
    wanted = [r for r in records if 7 <= r.offset < 30]
    assert lines_by_key(out, records) == expected_by_key(wanted)

    # P:N pairs read only the partitions named, from exactly there
    partition = records[0].partition
    out = await run_replay(kafka_settings, topic, "--from-offset", f"{partition}:11")
    wanted = [r for r in records if r.partition == partition and r.offset >= 11]
    assert out.splitlines() == [r.value for r in sorted(wanted, key=lambda r: r.offset)]

    # --key filters
    key = SYMBOLS[1]
    out = await run_replay(kafka_settings, topic, "--key", key, "--from-offset", "3")
    wanted = [r for r in records if r.key == key.encode() and r.offset >= 3]
    assert out.splitlines() == [r.value for r in sorted(wanted, key=lambda r: r.offset)]

    # --partition restricts, to a file
    path = tmp_path / "out.jsonl"
    await run_replay(kafka_settings, topic, "--partition", str(partition), "-o", str(path))
    wanted = [r for r in records if r.partition == partition]
    assert path.read_bytes().splitlines() == [r.value for r in wanted]


async def test_replay_to_a_topic_keeps_keys_headers_and_order(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    source = await new_topic(partitions=3, config=KEEP_OLD)
    target = await new_topic(partitions=3, config=KEEP_OLD)
    bootstrap = kafka_settings.bootstrap_servers
    records = await produce_ticks(bootstrap, source)
    out = await run_replay(kafka_settings, source, "--to-topic", target, "--keep-timestamps")
    assert out == b""
    copied = await read_topic(bootstrap, target, until=len(records))

    def view(rs: Records) -> dict[bytes | None, list[tuple[bytes | None, object, int]]]:
        grouped: dict[bytes | None, list[tuple[bytes | None, object, int]]] = defaultdict(list)
        for r in sorted(rs, key=lambda r: (r.partition, r.offset)):
            grouped[r.key].append((r.value, list(r.headers), r.timestamp))
        return dict(grouped)

    assert view(copied) == view(records)


async def test_100k_records_match_a_plain_consumer_byte_for_byte(
    kafka_settings: KafkaSettings, new_topic: NewTopic, tmp_path: Path
) -> None:
    count = 100_000
    topic = await new_topic(partitions=1)
    bootstrap = kafka_settings.bootstrap_servers
    began = time.monotonic()
    keys = [symbol.encode() for symbol in SYMBOLS]
    values = [
        nav_event(SYMBOLS[i % len(SYMBOLS)], T0 + i, 100 + i % 997).to_json() for i in range(count)
    ]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, linger_ms=20, max_batch_size=512 * 1024, acks=1
    )
    await producer.start()
    try:
        sent = [
            await producer.send(topic, value, key=keys[i % len(keys)])
            for i, value in enumerate(values)
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    produced = time.monotonic()

    path = tmp_path / "replay.jsonl"
    args = parse([topic, "--bootstrap", bootstrap, "--output", str(path)])
    async with asyncio.timeout(WAIT_S):
        assert await replay(args) == 0
    replayed = time.monotonic()

    plain = await read_topic(bootstrap, topic, until=count, timeout=WAIT_S)
    assert len(plain) == count
    expected = b"".join((r.value or b"") + b"\n" for r in plain)
    assert path.read_bytes() == expected
    assert expected == b"".join(v + b"\n" for v in values)
    print(  # shown with -s: where the time goes on this machine
        f"produce {produced - began:.1f}s, replay {replayed - produced:.1f}s,"
        f" plain read {time.monotonic() - replayed:.1f}s"
    )


async def test_the_command_writes_stdout_and_progress(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=3, config=KEEP_OLD)
    records = await produce_ticks(kafka_settings.bootstrap_servers, topic)
    argv = [sys.executable, "-m", "bridge.cli", "replay", topic, "--bootstrap",
            kafka_settings.bootstrap_servers, "--progress", "--to-offset", "10"]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    async with asyncio.timeout(WAIT_S):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    wanted = [r for r in records if r.offset < 10]
    assert lines_by_key(out, records) == expected_by_key(wanted)
    assert f"{len(wanted)} records replayed" in err.decode()
    assert "100%" in err.decode()

    bad = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.cli", "replay", topic, "--from-offset", "x",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT_S):
        _, err = await bad.communicate()
    assert bad.returncode == 2
    assert "partition:offset" in err.decode()

    missing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.cli", "replay", f"{topic}-absent",
        "--bootstrap", kafka_settings.bootstrap_servers,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    async with asyncio.timeout(WAIT_S):
        _, err = await missing.communicate()
    assert missing.returncode == 2
    assert "no such topic" in err.decode()
