"""`kaiko-bridge completeness`: read topics back (read_committed) and say, per key, which
intervals of the data between --from-time and --to-time are missing, and which of those lie
inside a `bridge.gap` event. Exit 0 only when nothing is missing outside a gap, 3 when
something is (1: a failure, such as Kafka unreachable; 2: a usage error).

Cadences: a VWAP instrument by its aggregate, hourly and daily NAV by their frequency,
settlements daily (by their date), real-time NAV by the steps longer than
`--real-time-multiple` times its usual one.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import IO, Any

import orjson

from bridge.completeness import Interval, KeyReport, by_cadence, on_grid, split_by_gaps
from bridge.consumer import RecordReader
from bridge.errors import BadRecord
from bridge.events import GAP, NAV_TICK, SETTLEMENT, VWAP_TICK
from bridge.normalize.nav import frequency_of
from bridge.normalize.vwap import aggregate_seconds, mark_key, parse_rfc3339_ns
from bridge.replay import Progress, kafka_settings, reachable
from bridge.replay_args import add_kafka_arguments, time_arg
from bridge.timefmt import iso_from_ms

EXIT_OK, EXIT_MISSING = 0, 3  # 1 and 2 are failures and usage errors, as everywhere
DAY_MS, HOUR_MS = 86_400_000, 3_600_000
NAV_STEP_MS = {"daily": DAY_MS, "hourly": HOUR_MS}

EPILOG = """\
times are ISO 8601 (UTC unless they say otherwise), Unix milliseconds, "now", or relative to
now: -90s, -15m, -1h, -2d. The range is half-open and applies to the data's own times.

exit: 0 nothing missing outside a gap event, 3 something missing, 1 failure, 2 usage.

examples:
  kaiko-bridge completeness vinter.nav.ticks --from-time -1d --to-time now
  kaiko-bridge completeness kaiko.vwap.ticks --from-time -2h --to-time -1h \\
      --key cbse:spot:btc-usd --json
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `kaiko-bridge completeness`."""
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("topics", nargs="+", metavar="TOPIC", help="topics to check")
    add_kafka_arguments(parser)
    parser.add_argument(
        "--from-time", type=time_arg, required=True, metavar="TIME", help="first data time checked"
    )
    parser.add_argument(
        "--to-time", type=time_arg, required=True, metavar="TIME", help="end, not included"
    )
    parser.add_argument(
        "--key",
        action="append",
        metavar="KEY",
        help="only records with this Kafka key: a symbol, or exchange:class:code (repeatable)",
    )
    parser.add_argument(
        "--real-time-multiple",
        type=float,
        default=5.0,
        metavar="N",
        help="a real-time NAV step longer than N times its usual one is missing (default 5)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    parser.add_argument(
        "--progress", action="store_true", help="a progress bar on stderr (default: on a tty)"
    )
    parser.set_defaults(completeness_parser=parser)


@dataclass
class Collected:
    """Data times (Unix ms) per (key, cadence), and the spans gap events cover per key."""

    stamps: dict[tuple[str, str], list[int]] = field(default_factory=lambda: defaultdict(list))
    gaps: dict[str, list[Interval]] = field(default_factory=lambda: defaultdict(list))

    def take(self, doc: dict[str, Any]) -> None:
        """One event read back; what is not a tick, a settlement or a gap is ignored."""
        data = doc.get("data")
        if not isinstance(data, dict):
            return
        kind = doc.get("type")
        try:
            if kind == NAV_TICK:
                symbol = str(data["symbol"])
                self.stamps[(symbol, frequency_of(symbol))].append(int(data["timestamp"]))
            elif kind == SETTLEMENT:
                self.stamps[(str(data["symbol"]), "daily")].append(int(data["timestamp"]))
            elif kind == VWAP_TICK:
                key = mark_key(str(doc["subject"]), str(data["aggregate"]))
                ms = parse_rfc3339_ns(str(data["uid"])) // 1_000_000
                self.stamps[(key, str(data["aggregate"]))].append(ms)
            elif kind == GAP:
                key = mark_key(str(doc["subject"]), str(data.get("aggregate") or ""))
                after = parse_rfc3339_ns(str(data["first_after"])) // 1_000_000
                before = data.get("last_before")
                start = parse_rfc3339_ns(str(before)) // 1_000_000 + 1 if before else 0
                self.gaps[key].append(Interval(start, after))
        except (KeyError, TypeError, ValueError, BadRecord):
            return  # not the bridge's event: the schemas say what is, not this tool


def reports(collected: Collected, start_ms: int, end_ms: int, multiple: float) -> list[KeyReport]:
    """Each key's report over [start_ms, end_ms)."""
    found = []
    for (key, cadence), stamps in sorted(collected.stamps.items()):
        inside = sorted(t for t in stamps if start_ms <= t < end_ms)
        step = NAV_STEP_MS.get(cadence)
        if step is None and cadence != "real-time":
            step = aggregate_seconds(cadence) * 1000
        if step is None:
            missing = by_cadence(inside, multiple)
            expected = None
        else:
            missing = on_grid(inside, step, start_ms, end_ms)
            expected = len(range(-(-start_ms // step) * step, end_ms, step))
        outside, covered = split_by_gaps(missing, collected.gaps.get(key, []))
        found.append(KeyReport(key, cadence, expected, len(set(inside)), outside, covered))
    return found


async def collect(args: argparse.Namespace, stderr: IO[str]) -> Collected:
    settings = kafka_settings(args)
    collected = Collected()
    reader = RecordReader(settings, args.topics, stop_at_end=True, keys=args.key)
    progress = Progress(stderr, label="completeness") if args.progress or stderr.isatty() else None

    async def read() -> None:
        async with reader:
            async for batch in reader.batches():
                for record in batch:
                    try:
                        doc = orjson.loads(record.value or b"")
                    except orjson.JSONDecodeError:
                        continue
                    if isinstance(doc, dict):
                        collected.take(doc)
                if progress is not None:
                    progress.update(*reader.progress())

    await reachable(settings, read())
    if progress is not None:
        progress.close(*reader.progress(), sum(map(len, collected.stamps.values())), "read")
    return collected


def _span(interval: Interval) -> str:
    return f"[{iso_from_ms(interval.start)}, {iso_from_ms(interval.end)})"


def write_text(found: list[KeyReport], out: IO[str]) -> None:
    out.write(f"{'key':<34}{'cadence':<10}{'expected':>9}{'present':>9}  missing\n")
    for report in found:
        expected = "-" if report.expected is None else str(report.expected)
        missing = f"{len(report.missing)} spans" if report.missing else "none"
        if report.in_gaps:
            missing += f" ({len(report.in_gaps)} more inside gap events)"
        counts = f"{expected:>9}{report.present:>9}"
        out.write(f"{report.key[:33]:<34}{report.cadence:<10}{counts}  {missing}\n")
        for span in report.missing:
            out.write(f"  missing {report.key} {_span(span)}\n")


def write_json(found: list[KeyReport], start: datetime, end: datetime, out: IO[str]) -> None:
    doc = {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "complete": all(r.complete for r in found),
        "keys": [asdict(r) for r in found],
    }
    out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


def run(args: argparse.Namespace, *, stdout: IO[str] | None = None) -> int:
    """Entry point of `kaiko-bridge completeness`: 0 when nothing is missing outside a gap."""
    out, err = stdout or sys.stdout, sys.stderr
    if args.from_time >= args.to_time:
        args.completeness_parser.error("--from-time must be before --to-time")
    collected = asyncio.run(collect(args, err))
    start_ms = int(args.from_time.timestamp() * 1000)
    end_ms = int(args.to_time.timestamp() * 1000)
    found = reports(collected, start_ms, end_ms, args.real_time_multiple)
    if args.json:
        write_json(found, args.from_time, args.to_time, out)
    else:
        write_text(found, out)
    return EXIT_OK if all(r.complete for r in found) else EXIT_MISSING
