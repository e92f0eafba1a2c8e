"""The arguments of `kaiko-bridge replay`: their types, their help, and the usage errors
argparse cannot see alone."""

from __future__ import annotations

import argparse
import contextlib
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bridge.errors import ConfigError
from bridge.replay_output import FORMAT_HELP

EPILOG = (
    """\
positions are per partition and half-open: --from-* names the first record replayed,
--to-* the first one not replayed. Replay stops there, or at the end offsets the topics had
when it started (unless --follow), and exits 0.

times are ISO 8601 (UTC unless they say otherwise), Unix milliseconds, "now", or relative to
now: -90s, -15m, -1h, -2d.

"""
    + FORMAT_HELP
    + """

Kafka: --bootstrap, else the kafka section of --config, else the broker tools/kafka/start
last started (its state file), else 127.0.0.1:9092.

examples:
  kaiko-bridge replay vinter.nav.ticks --from-time -1h --format '%k %T %s\\n'
  kaiko-bridge replay vinter.nav.ticks --from-time 2024-05-01T00:00Z --output may.jsonl
  kaiko-bridge replay kaiko.vwap.ticks --from-offset 0:1200 --from-offset 2:900 \\
      --key cbse:spot:btc-usd --count 10 --format json
  kaiko-bridge replay bridge.dlq --from-time 2024-05-01 --to-topic bridge.dlq.retry --create
"""
)


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


_RELATIVE = re.compile(r"-(\d+(?:\.\d+)?)([smhd])")
_UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def time_arg(text: str, *, now: datetime | None = None) -> datetime:
    """ISO 8601 (a time without an offset is UTC), Unix milliseconds, `now`, or a time
    relative to now (`-1h`)."""
    text = text.strip()
    moment_now = now or datetime.now(UTC)
    if text == "now":
        return moment_now
    relative = _RELATIVE.fullmatch(text)
    if relative:
        amount, unit = relative.groups()
        return moment_now - timedelta(**{_UNIT[unit]: float(amount)})
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give an ISO 8601 time (2024-05-01T12:00:00Z), Unix milliseconds, "
            "now, or -90s, -15m, -1h, -2d"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a count of at least 1")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kaiko-bridge replay`."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to replay")
    add_kafka_arguments(parser)
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
    parser.add_argument(
        "--count", "-n", type=_positive, metavar="N", help="stop after N records (kcat's -c)"
    )
    out = parser.add_mutually_exclusive_group()
    out.add_argument(
        "--output", "-o", metavar="FILE", help="write to FILE (- or nothing: standard output)"
    )
    out.add_argument(
        "--to-topic",
        metavar="TOPIC",
        help="re-publish values, keys and headers to TOPIC (idempotent, acks=all)",
    )
    parser.add_argument(
        "--format", "-f", metavar="json|TEMPLATE", help="what to write of each record (below)"
    )
    parser.add_argument(
        "--create",
        action="store_true",
        help="with --to-topic: create TOPIC if missing, with the partitions of the first TOPIC",
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
    parser.set_defaults(replay_parser=parser)


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --bootstrap: where the Kafka of a command is."""
    parser.add_argument("--config", "-c", type=Path, help="YAML settings file (kafka section)")
    parser.add_argument(
        "--bootstrap",
        metavar="HOST:PORT",
        help="Kafka bootstrap servers (default: --config's, else the broker tools/kafka/start"
        " started, else 127.0.0.1:9092)",
    )


def check_arguments(args: argparse.Namespace) -> None:
    """Usage errors that argparse cannot see alone: exit 2 with one line."""
    fail = args.replay_parser.error
    if args.to_topic is None:
        for flag, given in (("--keep-timestamps", args.keep_timestamps), ("--create", args.create)):
            if given:
                fail(f"{flag} applies only with --to-topic")
    elif args.format is not None:
        fail("--format applies to an output stream, not to --to-topic (which copies records)")
    if args.from_time is not None and args.to_time is not None and args.from_time > args.to_time:
        fail(f"--from-time {args.from_time:%Y-%m-%dT%H:%M:%SZ} is after --to-time")
    starts = _merge_quietly(args.from_offset)
    stops = _merge_quietly(args.to_offset)
    if isinstance(starts, int) and isinstance(stops, int) and starts > stops:
        fail(f"--from-offset {starts} is after --to-offset {stops}")
    if isinstance(starts, dict) and isinstance(stops, dict):
        inverted = sorted(p for p in starts.keys() & stops.keys() if starts[p] > stops[p])
        if inverted:
            fail(f"--from-offset is after --to-offset on partitions {inverted}")


def merge_offsets(
    values: list[dict[int, int] | int] | None, option: str
) -> dict[int, int] | int | None:
    """Repeated --from-offset / --to-offset values as one: N, or P:N pairs."""
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


def _merge_quietly(values: list[dict[int, int] | int] | None) -> dict[int, int] | int | None:
    with contextlib.suppress(ConfigError):
        return merge_offsets(values, "")
    return None


_TIME_OPTIONS = ("--from-time", "--to-time")


def joined_times(argv: list[str]) -> list[str]:
    """`--from-time -1h` as `--from-time=-1h`: argparse would take `-1h` for an option."""
    out: list[str] = []
    for token in argv:
        if out and out[-1] in _TIME_OPTIONS and _RELATIVE.fullmatch(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out
