"""`kaiko-bridge replay`: copy a range of topics, by offset or time, to a stream or a topic.

By default the values are written as they are on Kafka, byte for byte, one a line (the
bridge's values are compact JSON); `--format` writes more of each record; `--to-topic`
copies records with their keys and headers through an idempotent `acks=all` producer.
Ranges are half-open, per partition; replay stops at the bound, after `--count` records, or
at the end offsets captured at start, and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import IO, Any, TypeVar

from aiokafka.admin import NewTopic
from aiokafka.errors import KafkaConnectionError

from bridge.config import KafkaSettings
from bridge.configfile import load_settings
from bridge.consumer import RecordReader, StartAt, StopAt
from bridge.errors import BridgeError, ConfigError
from bridge.kafka import admin_client
from bridge.replay_args import add_arguments, add_kafka_arguments, check_arguments, merge_offsets
from bridge.replay_output import RecordFormat, StreamSink, TopicSink

__all__ = ["add_arguments", "add_kafka_arguments", "kafka_settings", "reachable", "run"]

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2  # as bridge.cli
T = TypeVar("T")
PROGRESS_INTERVAL_S = 0.25


def local_broker() -> str | None:
    """The bootstrap address of the broker `tools/kafka/start` started last, if it left its
    state file (`$BRIDGE_KAFKA_HOME/broker.json`, else `.cache/kafka/broker.json` here)."""
    home = os.environ.get("BRIDGE_KAFKA_HOME")
    path = Path(home) if home else Path.cwd() / ".cache" / "kafka"
    try:
        state = json.loads((path / "broker.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    bootstrap = state.get("bootstrap") if isinstance(state, dict) else None
    return bootstrap if isinstance(bootstrap, str) else None


def kafka_settings(args: argparse.Namespace) -> KafkaSettings:
    """--bootstrap, else --config's kafka section, else the local broker, else the default."""
    settings = load_settings(args.config).kafka if args.config else KafkaSettings()
    bootstrap = args.bootstrap or (None if args.config else local_broker())
    if bootstrap:
        settings = settings.model_copy(update={"bootstrap_servers": bootstrap})
    return settings


class Progress:
    """A one-line progress bar on a text stream, redrawn at most every 0.25 s."""

    def __init__(self, stream: IO[str], width: int = 30, *, label: str = "replay") -> None:
        self._stream = stream
        self._label = label
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
        self._stream.write(f"\r{self._label} {line} offsets, {rate:,.0f}/s ")
        self._stream.flush()

    def close(self, done: int, total: int | None, written: int, what: str = "replayed") -> None:
        self.update(done, total, force=True)
        self._stream.write(f"\n{written} records {what}\n")
        self._stream.flush()


def _start_and_partitions(args: argparse.Namespace) -> tuple[StartAt, list[int] | None]:
    partitions = sorted(set(args.partition)) if args.partition else None
    start: StartAt = "beginning"
    offsets = merge_offsets(args.from_offset, "from_offset")
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


def _output(path: str | None, files: contextlib.ExitStack, stdout: IO[bytes]) -> IO[bytes]:
    if path is None or path == "-":
        return stdout
    try:
        return files.enter_context(Path(path).open("wb"))
    except OSError as exc:
        raise ConfigError("output", f"cannot write {path}: {exc.strerror}") from None


async def _target_topic(settings: KafkaSettings, args: argparse.Namespace) -> None:
    """Make sure --to-topic exists: create it with --create, else say how to."""
    async with admin_client(settings) as admin:
        existing = set(await admin.list_topics())
        if args.to_topic in existing:
            return
        source = args.topics[0]
        described = await admin.describe_topics([source]) if source in existing else []
        partitions = len(described[0].get("partitions", [])) if described else 1
        if not args.create:
            raise ConfigError(
                "to_topic",
                f"topic {args.to_topic} does not exist; add --create to create it with the "
                f"{partitions} partitions of {source}",
            )
        new = NewTopic(args.to_topic, partitions, settings.replication_factor)
        await admin.create_topics([new])


async def replay(args: argparse.Namespace, *, stdout: IO[bytes] | None = None) -> int:
    """Run one replay as parsed by `add_arguments`; 0 once the end is reached."""
    settings = kafka_settings(args)
    start, partitions = _start_and_partitions(args)
    stop: StopAt | None = merge_offsets(args.to_offset, "to_offset")
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
    sink: StreamSink | TopicSink
    with contextlib.ExitStack() as files:
        if args.to_topic:
            await reachable(settings, _target_topic(settings, args))
            sink = TopicSink(settings, args.to_topic, keep_timestamps=args.keep_timestamps)
            await sink.start()
        else:
            stream = _output(args.output, files, stdout or sys.stdout.buffer)
            sink = StreamSink(stream, RecordFormat(args.format))
        left = args.count
        try:
            async with reader:
                async for batch in reader.batches():
                    taken = batch if left is None else batch[:left]
                    if left is not None:
                        left -= len(taken)
                    await sink.write(taken)
                    if progress is not None:
                        progress.update(*reader.progress())
                    if left == 0:
                        break
        finally:
            await sink.close()
        if progress is not None:
            progress.close(*reader.progress(), sink.written)
    return EXIT_OK


async def reachable(settings: KafkaSettings, work: Coroutine[Any, Any, T]) -> T:
    """`work`, or one clear error naming the address when no broker answers."""
    try:
        return await work
    except KafkaConnectionError:
        raise BridgeError(
            f"cannot reach Kafka at {settings.bootstrap_servers}: no broker answered"
        ) from None


def run(args: argparse.Namespace) -> int:
    """Entry point of `kaiko-bridge replay` (arguments from `add_arguments`)."""
    check_arguments(args)
    try:
        return asyncio.run(replay(args))
    except BrokenPipeError:
        # The reader of stdout left (e.g. `| head`): not a failure of the replay. Point
        # stdout at /dev/null so that the interpreter's last flush does not fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK
