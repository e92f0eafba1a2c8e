"""`kaiko-bridge replay`: copy a range of topics, by offset or time, to a file or a topic.

The values are copied as they are on Kafka, byte for byte: to JSON Lines (one value a line;
the bridge's values are compact JSON without newlines) or to another topic with their keys
and headers, through an idempotent `acks=all` producer. Ranges are half-open, per partition:
from the first offset read (default: the beginning) to the first offset not read; replay
stops there, or at the end offsets captured at start, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from aiokafka.errors import KafkaError

from bridge.config import KafkaSettings, load_settings
from bridge.consumer import KafkaRecord, RecordReader, StartAt, StopAt
from bridge.errors import BridgeError, ConfigError, PublishError
from bridge.kafka import new_producer

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2  # as bridge.cli
PROGRESS_INTERVAL_S = 0.25

EPILOG = """\
positions are per partition and half-open: --from-* names the first record replayed,
--to-* the first one not replayed. Replay stops there, or at the end offsets the topics had
when it started (unless --follow), and exits 0.

examples:
  kaiko-bridge replay vinter.nav.ticks --from-time 2024-05-01T00:00Z --output may.jsonl
  kaiko-bridge replay kaiko.vwap.ticks --from-offset 0:1200 --from-offset 2:900 \\
      --key cbse:spot:btc-usd
  kaiko-bridge replay bridge.dlq --from-time 2024-05-01 --to-topic bridge.dlq.retry
"""


# -- argument types ------------------------------------------------------------------------------


def _natural(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def offsets_arg(text: str) -> dict[int, int] | int:
    """`N` (every partition) or comma-separated `P:N` pairs."""
    text = text.strip()
    try:
        if ":" not in text:
            return _natural(text)
        pairs: dict[int, int] = {}
        for item in text.split(","):
            partition, offset = item.split(":")
            pairs[_natural(partition)] = _natural(offset)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an offset N or partition:offset pairs P:N[,P:N...]"
        ) from None
    return pairs


def time_arg(text: str) -> datetime:
    """ISO 8601 (a time without an offset is UTC), or Unix milliseconds."""
    text = text.strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an ISO 8601 time (2024-05-01T12:00:00Z) or Unix milliseconds"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kaiko-bridge replay`."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to replay")
    parser.add_argument("--config", "-c", type=Path, help="YAML settings file (kafka section)")
    parser.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: from --config, else 127.0.0.1:9092)",
    )
    start = parser.add_mutually_exclusive_group()
    start.add_argument(
        "--from-offset",
        type=offsets_arg,
        action="append",
        metavar="N|P:N",
        help="first offset: N on every partition, or P:N pairs (repeatable; with pairs only,"
        " only the partitions named are read)",
    )
    start.add_argument(
        "--from-time", type=time_arg, metavar="TIME", help="first record at or after TIME"
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--to-offset",
        type=offsets_arg,
        action="append",
        metavar="N|P:N",
        help="first offset not replayed: N on every partition, or P:N pairs (repeatable)",
    )
    stop.add_argument(
        "--to-time", type=time_arg, metavar="TIME", help="stop before the first record at TIME"
    )
    parser.add_argument(
        "--key", action="append", metavar="SYMBOL", help="only records with this key (repeatable)"
    )
    parser.add_argument(
        "--partition",
        type=int,
        action="append",
        metavar="P",
        help="only this partition (repeatable)",
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--output", "-o", type=Path, metavar="FILE", help="JSON Lines file")
    out.add_argument(
        "--to-topic",
        metavar="TOPIC",
        help="re-publish values, keys and headers to TOPIC (idempotent, acks=all)",
    )
    parser.add_argument(
        "--keep-timestamps",
        action="store_true",
        help="with --to-topic: keep the records' timestamps (beware time-based retention)",
    )
    parser.add_argument(
        "--follow",
        action="store_true",
        help="do not stop at the end offsets captured at start: wait for the --to-* bound"
        " (without one, tail until interrupted)",
    )
    parser.add_argument(
        "--progress", action="store_true", help="progress on stderr even when it is not a TTY"
    )


# -- the pieces ----------------------------------------------------------------------------------


def _merge(values: list[dict[int, int] | int] | None, option: str) -> dict[int, int] | int | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    merged: dict[int, int] = {}
    for value in values:
        if isinstance(value, int):
            raise ConfigError(option, "give one offset N, or P:N pairs, not both")
        merged.update(value)
    return merged


def _settings(args: argparse.Namespace) -> KafkaSettings:
    settings = load_settings(args.config).kafka
    if args.bootstrap:
        settings = settings.model_copy(update={"bootstrap_servers": args.bootstrap})
    return settings


class Progress:
    """A one-line progress bar on a text stream, redrawn at most every 0.25 s."""

    def __init__(self, stream: IO[str], width: int = 30) -> None:
        self._stream = stream
        self._width = width
        self._began = time.monotonic()
        self._drawn = 0.0

    def update(self, done: int, total: int | None, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drawn < PROGRESS_INTERVAL_S:
            return
        self._drawn = now
        rate = done / max(now - self._began, 1e-6)
        if total:
            share = min(done / total, 1.0)
            bar = "#" * int(share * self._width)
            line = f"[{bar:<{self._width}}] {share:4.0%} {done}/{total}"
        else:
            line = f"{done}"
        self._stream.write(f"\rreplay {line} offsets, {rate:,.0f}/s ")
        self._stream.flush()

    def close(self, done: int, total: int | None, written: int) -> None:
        self.update(done, total, force=True)
        self._stream.write(f"\n{written} records replayed\n")
        self._stream.flush()


class _FileSink:
    """JSON Lines: each value as it is on Kafka, then a newline."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.written = 0

    async def write(self, batch: Sequence[KafkaRecord]) -> None:
        lines = []
        for record in batch:
            value = record.value
            if value is None:
                value = b"null"  # a tombstone: JSON null keeps one line per record
            elif b"\n" in value:
                raise BridgeError(
                    f"{record.topic} partition {record.partition} offset {record.offset}: the"
                    " value holds a newline, which JSON Lines cannot carry byte for byte;"
                    " use --to-topic"
                )
            lines.append(value)
        lines.append(b"")
        self._stream.write(b"\n".join(lines))
        self.written += len(batch)

    async def close(self) -> None:
        self._stream.flush()


class _TopicSink:
    """Re-publishes records with their keys and headers through an idempotent producer."""

    def __init__(self, settings: KafkaSettings, topic: str, *, keep_timestamps: bool) -> None:
        self._producer = new_producer(settings)
        self._topic = topic
        self._keep_timestamps = keep_timestamps
        self.written = 0

    async def start(self) -> None:
        try:
            await self._producer.start()
            partitions = await self._producer.partitions_for(self._topic)
        except KafkaError as exc:
            await self._producer.stop()
            raise PublishError(f"cannot publish to {self._topic}: {exc}") from exc
        if not partitions:
            await self._producer.stop()
            raise ConfigError("to_topic", f"no such topic: {self._topic}")

    async def write(self, batch: Sequence[KafkaRecord]) -> None:
        try:
            sent = [
                await self._producer.send(
                    self._topic,
                    value=record.value,
                    key=record.key,
                    headers=list(record.headers),
                    timestamp_ms=record.timestamp if self._keep_timestamps else None,
                )
                for record in batch
            ]
            await asyncio.gather(*sent)  # the batch is on Kafka before the next is read
        except KafkaError as exc:
            raise PublishError(f"publishing to {self._topic} failed: {exc}") from exc
        self.written += len(batch)

    async def close(self) -> None:
        await self._producer.stop()


def _start_and_partitions(args: argparse.Namespace) -> tuple[StartAt, list[int] | None]:
    partitions = sorted(set(args.partition)) if args.partition else None
    start: StartAt = "beginning"
    offsets = _merge(args.from_offset, "from_offset")
    if offsets is not None:
        start = offsets
        if isinstance(offsets, dict) and partitions is None:
            partitions = sorted(offsets)
        elif isinstance(offsets, dict) and partitions is not None:
            unnamed = sorted(set(partitions) - set(offsets))
            if unnamed:
                raise ConfigError("from_offset", f"no start offset for partitions {unnamed}")
    elif args.from_time is not None:
        start = args.from_time
    return start, partitions


async def replay(args: argparse.Namespace, *, stdout: IO[bytes] | None = None) -> int:
    """Run one replay as parsed by `add_arguments`; 0 once the end is reached."""
    settings = _settings(args)
    start, partitions = _start_and_partitions(args)
    stop: StopAt | None = _merge(args.to_offset, "to_offset")
    if args.to_time is not None:
        stop = args.to_time
    reader = RecordReader(
        settings,
        args.topics,
        start=start,
        stop=stop,
        stop_at_end=not args.follow,
        partitions=partitions,
        keys=args.key,
    )
    show = args.progress or sys.stderr.isatty()
    progress = Progress(sys.stderr) if show else None
    sink: _FileSink | _TopicSink
    with contextlib.ExitStack() as files:
        if args.to_topic:
            sink = _TopicSink(settings, args.to_topic, keep_timestamps=args.keep_timestamps)
            await sink.start()
        elif args.output is not None:
            sink = _FileSink(files.enter_context(args.output.open("wb")))
        else:
            sink = _FileSink(stdout or sys.stdout.buffer)
        try:
            async with reader:
                async for batch in reader.batches():
                    await sink.write(batch)
                    if progress is not None:
                        progress.update(*reader.progress())
        finally:
            await sink.close()
        if progress is not None:
            progress.close(*reader.progress(), sink.written)
    return EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Entry point of `kaiko-bridge replay` (arguments from `add_arguments`)."""
    try:
        return asyncio.run(replay(args))
    except BrokenPipeError:
        # The reader of stdout left (e.g. `| head`): not a failure of the replay. Point
        # stdout at /dev/null so that the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
