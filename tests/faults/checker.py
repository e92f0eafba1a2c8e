"""What the simulators sent, compared with what Kafka holds (read with read_committed).

For each stream: how many records were expected and found, which were lost, which ids
appear more than once, where a key's records are out of order, and what Kafka holds that
nobody sent. `Check.summary()` gives the counts with a few examples of each, so a failing
scenario says what went wrong, not only that something did.

* NAV: every record the Vinter simulator pushed (`VinterSim.emitted`) once, in timestamp
  order per symbol, with the value that was pushed.
* VWAP: every interval the Kaiko simulator delivered (`KaikoSim.sent`) at most once, in
  interval order per instrument; an interval missing from Kafka counts as lost unless a
  `bridge.gap` event of its instrument spans it (VWAP has no replay: the bridge reports
  what it may have missed instead).
* Settlements: per symbol and date, revisions 1..n each exactly once and in order, the last
  one carrying the simulator's current close, for every official daily record the poller's
  window covers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeAlias

import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from bridge.aiokafka_internals import client_of, partitions_now
from bridge.config import KafkaSettings, Topics
from bridge.normalize.vwap import parse_rfc3339_ns
from bridgedev.sim.kaiko import KaikoSim, SentRecord
from bridgedev.sim.vinter import VinterSim

Record: TypeAlias = ConsumerRecord[bytes, bytes]
EXAMPLES = 5


@dataclass
class Check:
    """The outcome of comparing one stream."""

    name: str
    expected: int = 0
    found: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)
    out_of_order: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    covered_by_gaps: int = 0  # VWAP: missing, but inside a reported gap
    gaps: int = 0  # VWAP: `bridge.gap` events read

    @property
    def ok(self) -> bool:
        return not (
            self.lost or self.duplicates or self.out_of_order or self.unexpected or self.mismatched
        )

    def counts(self) -> dict[str, int]:
        return {
            "expected": self.expected,
            "found": self.found,
            "lost": len(self.lost),
            "duplicate_ids": len(self.duplicates),
            "out_of_order": len(self.out_of_order),
            "unexpected": len(self.unexpected),
            "mismatched": len(self.mismatched),
            "covered_by_gaps": self.covered_by_gaps,
            "gaps": self.gaps,
        }

    def summary(self) -> str:
        lines = [f"{self.name}: " + ", ".join(f"{k}={v}" for k, v in self.counts().items())]
        for label, items in (
            ("lost", self.lost),
            ("duplicated", [f"{i} x{n}" for i, n in self.duplicates.items()]),
            ("out of order", self.out_of_order),
            ("unexpected", self.unexpected),
            ("mismatched", self.mismatched),
        ):
            if items:
                shown = ", ".join(items[:EXAMPLES])
                more = f" (+{len(items) - EXAMPLES} more)" if len(items) > EXAMPLES else ""
                lines.append(f"  {label}: {shown}{more}")
        return "\n".join(lines)


# -- reading Kafka ---------------------------------------------------------------------------


class TopicLog:
    """Every record of one topic from the beginning, read_committed, kept in offset order.

    `async with TopicLog(bootstrap, topic) as log: await log.read_to_end()`; reading again
    continues where it stopped.
    """

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.topic = topic
        self.records: list[Record] = []
        self._consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap,
            enable_auto_commit=False,
            isolation_level="read_committed",
            request_timeout_ms=15_000,
        )
        self._tps: list[TopicPartition] = []

    async def __aenter__(self) -> Self:
        await self._consumer.start()
        try:
            async with asyncio.timeout(60):
                while True:
                    parts = await partitions_now(client_of(self._consumer), self.topic)
                    if parts:
                        break
                    await asyncio.sleep(0.2)
            self._tps = [TopicPartition(self.topic, p) for p in sorted(parts)]
            self._consumer.assign(self._tps)
            await self._consumer.seek_to_beginning(*self._tps)
        except BaseException:
            await self._consumer.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._consumer.stop()

    async def _fetch(self, timeout_s: float) -> int:
        batch = await self._consumer.getmany(timeout_ms=int(timeout_s * 1000), max_records=20_000)
        fresh = [r for tp in self._tps for r in batch.get(tp, [])]
        self.records.extend(fresh)
        return len(fresh)

    async def read_to_end(self, timeout: float = 60.0) -> list[Record]:
        """Read up to the end (the last stable offset) as of this call."""
        async with asyncio.timeout(timeout):
            ends = await self._consumer.end_offsets(self._tps)
            while not all([await self._consumer.position(tp) >= ends[tp] for tp in self._tps]):
                await self._fetch(0.5)
        return self.records

    async def read_until(
        self, done: Callable[[list[Record]], bool], timeout: float, idle: float = 1.0
    ) -> bool:
        """Read until `done(records)` holds, then until nothing new came for `idle` seconds.

        Returns whether `done` held within `timeout` (the checks then say what is missing).
        `done` is asked only once the log is read to its end, and then after each fetch
        that brought something: it reads every record, so asking it after every fetch of a
        long backlog would cost the square of the log's length.
        """
        deadline = time.monotonic() + timeout
        with contextlib.suppress(TimeoutError):
            await self.read_to_end(max(1.0, deadline - time.monotonic()))
        while not done(self.records):
            while not await self._fetch(0.5):
                if time.monotonic() > deadline:
                    return False
        while time.monotonic() < deadline and await self._fetch(idle):
            pass
        return True


def documents(records: Iterable[Record]) -> tuple[list[dict[str, Any]], list[str]]:
    """The JSON objects among `records`, in order, each with its `_offset` (partition,
    offset); and where the records that are not JSON objects are (the checks report them
    as unexpected: nothing hides there)."""
    docs: list[dict[str, Any]] = []
    unreadable: list[str] = []
    for record in records:
        try:
            doc = orjson.loads(record.value) if record.value is not None else None
        except orjson.JSONDecodeError:
            doc = None
        if isinstance(doc, dict):
            doc["_offset"] = (record.partition, record.offset)
            docs.append(doc)
        else:
            unreadable.append(f"not a JSON object at {record.partition}:{record.offset}")
    return docs, unreadable


# -- comparisons -----------------------------------------------------------------------------


def _duplicates(ids: Iterable[str]) -> dict[str, int]:
    return {i: n for i, n in Counter(ids).items() if n > 1}


def _order(
    docs: Iterable[dict[str, Any]], key: Callable[[dict[str, Any]], tuple[str, Any]]
) -> list[str]:
    """Records whose position (per key) is below that of an earlier record of the key."""
    last: dict[str, Any] = {}
    problems: list[str] = []
    for doc in sorted(docs, key=lambda d: d["_offset"]):
        name, position = key(doc)
        before = last.get(name)
        if before is not None and position < before:
            problems.append(f"{name}: {position} after {before} at {doc['_offset']}")
        last[name] = position if before is None else max(before, position)
    return problems


def nav_ids(sent: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Mapping[str, Any]]:
    """Event id -> the record the simulator pushed (the last push of a timestamp wins)."""
    return {f"nav:{symbol}:{r['timestamp']}:1": r for symbol, rs in sent.items() for r in rs}


def check_nav(sent: Mapping[str, Sequence[Mapping[str, Any]]], records: Iterable[Record]) -> Check:
    """NAV ticks in Kafka against the records the Vinter simulator pushed, per symbol."""
    expected = nav_ids(sent)
    everything, unreadable = documents(records)
    docs = [d for d in everything if d.get("type") == "vinter.nav.tick"]
    check = Check("nav", expected=len(expected), found=len(docs))
    ids = [str(d["id"]) for d in docs]
    present = set(ids)
    check.lost = sorted(set(expected) - present, key=lambda i: (i.rsplit(":", 1)[0], i))
    check.duplicates = _duplicates(ids)
    check.unexpected = [*unreadable, *sorted(present - set(expected))]
    check.unexpected += [
        f"{d.get('type')} at {d['_offset']}"
        for d in everything
        if d.get("type") != "vinter.nav.tick"
    ]
    for doc in docs:
        record = expected.get(str(doc["id"]))
        if record is not None:
            data = doc["data"]
            value = record.get("value", record.get("close"))
            if data.get("value", data.get("close")) != value:
                check.mismatched.append(f"{doc['id']}: {data.get('value')} != {value}")
    check.out_of_order = _order(docs, lambda d: (d["subject"], d["data"]["timestamp"]))
    return check


def vwap_id(record: SentRecord) -> str:
    return (
        f"vwap:{record.exchange}:{record.instrument_class}:{record.code}:"
        f"{record.aggregate}:{record.uid}"
    )


def check_vwap(sent: Sequence[SentRecord], records: Iterable[Record]) -> Check:
    """VWAP ticks in Kafka against what the Kaiko simulator delivered; a missing interval
    inside a `bridge.gap` of its instrument is reported, not lost."""
    expected = {vwap_id(r): r for r in sent}
    docs, unreadable = documents(records)
    ticks = [d for d in docs if d.get("type") == "kaiko.vwap.tick"]
    gaps: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for doc in docs:
        if doc.get("type") == "bridge.gap":
            data = doc["data"]
            low = parse_rfc3339_ns(data["last_before"]) if data.get("last_before") else -1
            gaps[(doc["subject"], data.get("aggregate") or "")].append(
                (low, parse_rfc3339_ns(data["first_after"]))
            )
    check = Check("vwap", expected=len(expected), found=len(ticks))
    check.gaps = sum(len(spans) for spans in gaps.values())
    ids = [str(d["id"]) for d in ticks]
    present = set(ids)
    for missing in sorted(set(expected) - present):
        record = expected[missing]
        key = (f"{record.exchange}:{record.instrument_class}:{record.code}", record.aggregate)
        at = parse_rfc3339_ns(record.uid)
        if any(low < at < high for low, high in gaps.get(key, [])):
            check.covered_by_gaps += 1
        else:
            check.lost.append(missing)
    check.duplicates = _duplicates(ids)
    check.unexpected = [*unreadable, *sorted(present - set(expected))]
    check.unexpected += [
        f"{d.get('type')} at {d['_offset']}"
        for d in docs
        if d.get("type") not in ("kaiko.vwap.tick", "bridge.gap")
    ]
    for doc in ticks:
        delivered = expected.get(str(doc["id"]))
        if delivered is not None and doc["data"]["price"] != delivered.price:
            check.mismatched.append(f"{doc['id']}: {doc['data']['price']} != {delivered.price}")
    check.out_of_order = _order(
        ticks,
        lambda d: (
            f"{d['subject']}|{d['data']['aggregate']}",
            parse_rfc3339_ns(d["data"]["uid"]),
        ),
    )
    return check


def settlement_window_start(now: datetime, backfill_days: int) -> int:
    """Unix ms of the first date a first-time poller fetches (midnight UTC, N days back)."""
    day = now.astimezone(UTC).date() - timedelta(days=backfill_days)
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)


def check_settlements(
    history: Mapping[str, Sequence[Mapping[str, Any]]],
    records: Iterable[Record],
    *,
    since_ms: int,
    until_ms: int,
) -> Check:
    """Settlements in Kafka against the simulator's daily history: every official record
    dated in [since_ms, until_ms) settled, revisions 1..n exactly once and in order per
    date, the newest revision with the current close."""
    everything, unreadable = documents(records)
    docs = [d for d in everything if d.get("type") == "vinter.nav.settlement"]
    current = {
        (symbol, str(r["date"])): r
        for symbol, rs in history.items()
        for r in rs
        if r.get("id") and since_ms <= int(r["timestamp"]) < until_ms
    }
    check = Check("settlements", expected=len(current), found=len(docs))
    ids = [str(d["id"]) for d in docs]
    check.duplicates = _duplicates(ids)
    revisions: dict[tuple[str, str], list[int]] = defaultdict(list)
    newest: dict[tuple[str, str], dict[str, Any]] = {}
    for doc in sorted(docs, key=lambda d: d["_offset"]):
        data = doc["data"]
        where = (str(data["symbol"]), str(data["date"]))
        revisions[where].append(int(data["revision"]))
        if int(data["revision"]) >= int(newest.get(where, {}).get("revision", 0)):
            newest[where] = data
    for where, record in sorted(current.items()):
        seen = revisions.get(where)
        if not seen:
            check.lost.append(f"{where[0]}:{where[1]}")
            continue
        if sorted(set(seen)) != list(range(1, max(seen) + 1)):
            check.lost.append(f"{where[0]}:{where[1]} revisions {sorted(seen)}")
        if float(newest[where]["close"]) != float(record["close"]):
            check.mismatched.append(
                f"{where[0]}:{where[1]} close {newest[where]['close']} != {record['close']}"
            )
    check.unexpected = [
        *unreadable,
        *sorted(f"{s}:{d}" for s, d in set(revisions) - set(current)),
        *(
            f"{d.get('type')} at {d['_offset']}"
            for d in everything
            if d.get("type") != "vinter.nav.settlement"
        ),
    ]
    check.out_of_order = _order(
        docs, lambda d: (f"{d['data']['symbol']}:{d['data']['date']}", d["data"]["revision"])
    )
    return check


# -- everything at once ----------------------------------------------------------------------


@dataclass
class Verdict:
    """The checks of one scenario, plus every record read (for the secret scan)."""

    checks: list[Check]
    records: dict[str, list[Record]]
    complete: bool  # everything expected arrived before the deadline

    def failures(self) -> list[str]:
        return [c.summary() for c in self.checks if not c.ok]

    def summary(self) -> str:
        late = [] if self.complete else ["(not everything expected arrived in time)"]
        return "\n".join([*(c.summary() for c in self.checks), *late])

    def raw(self) -> dict[str, bytes]:
        """Each topic's keys, values and headers as one blob (secrets must be in none)."""
        blobs: dict[str, bytes] = {}
        for topic, records in self.records.items():
            parts: list[bytes] = []
            for r in records:
                parts += [r.key or b"", r.value or b""]
                parts += [name.encode() + b"=" + value for name, value in r.headers]
            blobs[f"topic {topic}"] = b"\n".join(parts)
        return blobs


def _settled(check: Check) -> bool:
    return not check.lost and not check.mismatched


async def verify(
    bootstrap: str,
    topics: Topics,
    *,
    nav: Mapping[str, Sequence[Mapping[str, Any]]],
    vwap: Callable[[], Sequence[SentRecord]] | None = None,
    settlements: Callable[[list[Record]], Check] | None = None,
    timeout: float = 90.0,
) -> Verdict:
    """Read the bridge's topics until they hold everything the simulators sent (at most
    `timeout` in all), then compare. `nav` is what the Vinter simulator pushed per symbol;
    `vwap` says what the Kaiko simulator delivered (asked again at every look: a message
    being written when the simulator stalled is recorded once its write completes);
    `settlements` is a settlement check (`check_settlements` with its history and window
    bound in)."""
    deadline = time.monotonic() + timeout
    records: dict[str, list[Record]] = {}
    checks: list[Check] = []
    complete = True

    async def read(topic: str, check: Callable[[list[Record]], Check]) -> None:
        nonlocal complete
        async with TopicLog(bootstrap, topic) as log:
            left = max(1.0, deadline - time.monotonic())
            complete &= await log.read_until(lambda rs: _settled(check(rs)), left)
            records[topic] = log.records
        checks.append(check(records[topic]))

    await read(topics.nav_ticks, lambda rs: check_nav(nav, rs))
    if vwap is not None:
        await read(topics.vwap_ticks, lambda rs: check_vwap(vwap(), rs))
    if settlements is not None:
        await read(topics.settlements, settlements)
    for topic in (topics.dlq, topics.state):
        async with TopicLog(bootstrap, topic) as log:
            records[topic] = await log.read_to_end()
    return Verdict(checks, records, complete)


def against_simulators(
    settings: KafkaSettings,
    vinter: VinterSim,
    kaiko: KaikoSim,
    *,
    nav: Sequence[str],
    daily: Sequence[str],
    since_ms: int,
) -> Callable[..., Awaitable[Verdict]]:
    """`verify` bound to what the simulators sent up to now: NAV records of the `nav`
    symbols, every VWAP interval, the settlements of the `daily` symbols from `since_ms`.
    Call it (with an optional `timeout`) once the upstreams are quiet."""
    return functools.partial(
        verify,
        settings.bootstrap_servers,
        settings.topics,
        nav={s: vinter.emitted(s) for s in nav},
        vwap=lambda: kaiko.sent,
        settlements=functools.partial(
            check_settlements,
            {s: vinter.history(s) for s in daily},
            since_ms=since_ms,
            until_ms=int(time.time() * 1000),
        ),
    )
