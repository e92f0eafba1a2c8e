"""Every refusal of generated input reaches the dead-letter topic of a real broker, once.

The inputs of the decoders' property tests (`tests/generated.py`), at least 10,000 per parser
(counted, asserted), are decoded as the sources decode them. Each refusal takes the service's
own dead-letter path: the NAV and VWAP sinks over the publisher (socket refusals packed and
unpacked as the receiver child hands them on), the settlement poller's transactions; each
event too large to publish goes to the publisher, which dead-letters it. The topic is read
back: every reject arrives exactly once with its reason, source, key and the start of its
input, and `bridge_dead_letters_total` counts each.
"""

from __future__ import annotations

import base64
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import pytest

from bridge import metrics
from bridge.config import KafkaSettings
from bridge.errors import BadRecord
from bridge.events import MAX_DETAIL_CHARS, NAV_TICK, SETTLEMENT, VWAP_TICK, Event, dead_letter
from bridge.marks import MarkBook
from bridge.normalize.nav import frequency_of
from bridge.publish import Publisher
from bridge.sink.nav import GapRule, NavSink
from bridge.sink.transactions import Transactions
from bridge.sink.vwap import VwapSink
from bridge.sources.settlement import NAME as SETTLEMENT_SOURCE
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridge.sources.worker import pack_refused, unpack_refused
from tests.generated import (
    EXAMPLES,
    RECORD_LIMIT,
    SAMPLES,
    Outcome,
    Tally,
    rest_inputs,
    rest_page,
    rest_records,
    run,
    too_large,
    vwap_inputs,
    vwap_outcome,
    ws_inputs,
    ws_outcomes,
)
from tests.kafkautil import read_topic, schema_error, values

pytestmark = pytest.mark.integration

VWAP_SOURCE = "kaiko.vwap:binc:spot:eth-usdt:1s"
#: Dead letters per settlement transaction (the poller commits one per poll).
PER_TRANSACTION = 500


@dataclass(frozen=True)
class Reject:
    """One dead letter the service must write: where from, why, the input, and the start of
    the detail it must carry."""

    source: str
    reason: str
    key: str | None
    event_type: str
    raw: bytes | str
    detail: str

    @property
    def raw_bytes(self) -> bytes:
        return self.raw if isinstance(self.raw, bytes) else self.raw.encode()

    @cached_property
    def identity(self) -> tuple[str, str, str | None, str, str]:
        """What its letter must say, its id included (a hash of source and input: equal
        inputs refused twice are two letters with one id, hence counted, not collected)."""
        letter_id = dead_letter(source=self.source, raw=self.raw, reason=self.reason).id
        return letter_id, self.source, self.key, self.event_type, self.reason


@dataclass
class Collected:
    """What one parser made of its generated inputs: the count, the refusals with the symbol
    they came for, and the events too large to publish."""

    tally: Tally
    refused: list[tuple[str, BadRecord]] = field(default_factory=list)
    whole: list[tuple[str, BadRecord]] = field(default_factory=list)  # REST bodies refused
    oversize: list[Event] = field(default_factory=list)

    def take(self, size: int, symbol: str, outcomes: Iterable[Outcome]) -> None:
        reasons: list[str] = []
        for outcome in outcomes:
            if isinstance(outcome, BadRecord):
                self.refused.append((symbol, outcome))
                reasons.append(outcome.reason)
            elif too_large(outcome) is not None:
                self.oversize.append(outcome)
                reasons.append("too_large")
        self.tally.count(size, reasons)

    def counted(self) -> None:
        """Print what ran; assert enough did, one input past the record limit among them,
        and one reject of each kind the publisher makes itself (`too_large`)."""
        print(f"\n{self.tally}")
        assert self.tally.inputs >= EXAMPLES, self.tally
        assert self.tally.largest > RECORD_LIMIT, self.tally
        assert self.tally.reasons["too_large"] > 0, self.tally


def oversize_rejects(events: list[Event]) -> list[Reject]:
    """The `too_large` letters of events the publisher refuses, which carry their size."""
    return [
        Reject(e.source, "too_large", e.key, e.type, e.to_json(), f"a {len(e.to_json())}-byte")
        for e in events
    ]


def daily(symbol: str) -> bool:
    return frequency_of(symbol) == "daily"


def nav_sink(symbol: str, name: str, publisher: Publisher, kafka: KafkaSettings) -> NavSink:
    async def no_backfill(mark: int, until: int) -> None:
        raise AssertionError("a refusal asked for a back-fill")

    return NavSink(
        symbol,
        name,
        publisher,
        MarkBook(kafka.topics.nav_ticks),
        gaps=GapRule(frequency_of(symbol), 1000),
        gap_check_interval_s=5.0,
        backfill=no_backfill,
    )


def dead_letter_counts() -> Counter[tuple[str, str]]:
    """`bridge_dead_letters_total` now, per (source, reason)."""
    counts: Counter[tuple[str, str]] = Counter()
    for metric in metrics.DEAD_LETTERS.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                counts[sample.labels["source"], sample.labels["reason"]] += int(sample.value)
    return counts


async def arrive_once(
    kafka: KafkaSettings, expected: list[Reject], counted_before: Counter[tuple[str, str]]
) -> None:
    """Each reject is on the dead-letter topic exactly once (and nothing else is), valid,
    with the start of its input; the metric counted each."""
    records = await read_topic(
        kafka.bootstrap_servers, kafka.topics.dlq, until=len(expected), timeout=60, idle=1.0
    )
    docs = values(records)
    want = Counter(reject.identity for reject in expected)
    got_each = [
        (doc["id"], *(doc["data"][k] for k in ("source", "key", "event_type", "reason")))
        for doc in docs
    ]
    got = Counter(got_each)
    assert len(docs) == len(expected)
    assert got == want, (got - want, want - got)
    raw_of = {reject.identity: reject.raw_bytes for reject in expected}
    details: dict[tuple[str, str, str | None, str, str], set[str]] = {}
    for reject in expected:
        details.setdefault(reject.identity, set()).add(reject.detail[:MAX_DETAIL_CHARS])
    for record, (identity, doc) in zip(records, zip(got_each, docs, strict=True), strict=True):
        assert record.value is not None
        assert len(record.value) <= RECORD_LIMIT
        assert schema_error(doc) is None
        data: dict[str, Any] = doc["data"]
        assert any(data["detail"].startswith(d) for d in details[identity]), data["detail"]
        kept = data["raw"]
        kept = base64.b64decode(kept) if data["raw_encoding"] == "base64" else kept.encode()
        raw = raw_of[identity]
        assert raw.startswith(kept)
        assert len(kept) == len(raw) or "bytes kept" in data["detail"]
    counted = dead_letter_counts() - counted_before
    assert counted == Counter((reject.source, reject.reason) for reject in expected)


async def test_websocket_rejects_reach_the_dead_letter_topic(kafka_settings: KafkaSettings) -> None:
    """Refusals as the receiver child frames them for the parent, then the symbol's sink."""
    collected = Collected(Tally("websocket"))

    def each(case: tuple[str, bytes]) -> None:
        symbol, message = case
        collected.take(len(message), symbol, ws_outcomes(message, symbol))

    run(ws_inputs(), each)
    collected.counted()
    expected = [
        Reject(f"vinter.nav:{symbol}", r.reason, symbol, NAV_TICK, r.raw or b"", r.detail)
        for symbol, r in collected.refused
    ] + oversize_rejects(collected.oversize)
    before = dead_letter_counts()
    async with Publisher(kafka_settings) as publisher:
        sinks = {s: nav_sink(s, f"vinter.nav:{s}", publisher, kafka_settings) for s in SAMPLES}
        for symbol, refusal in collected.refused:
            handed_on = unpack_refused(pack_refused(refusal))  # child to parent, as framed
            await sinks[symbol].take([(handed_on, 0.0)], source=sinks[symbol].name)
        for event in collected.oversize:
            await publisher.publish(event)
        await publisher.flush(60)
    await arrive_once(kafka_settings, expected, before)


async def test_rest_rejects_reach_the_dead_letter_topic(kafka_settings: KafkaSettings) -> None:
    """Hourly and real-time refusals as a back-fill dead-letters them; daily ones as the
    settlement poller does, in transactions (a body under the client's name, a record under
    the poller's)."""
    collected = Collected(Tally("rest"))

    def each(case: tuple[str, bytes]) -> None:
        symbol, body = case
        page = rest_page(body)
        if isinstance(page, BadRecord):
            collected.whole.append((symbol, page))
            collected.tally.count(len(body), [page.reason])
        else:
            collected.take(len(body), symbol, rest_records(page, symbol))

    run(rest_inputs(), each)
    collected.counted()
    refused = [(s, r, REST_SOURCE) for s, r in collected.whole]
    refused += [
        (s, r, SETTLEMENT_SOURCE if daily(s) else REST_SOURCE) for s, r in collected.refused
    ]
    expected = [
        Reject(source, r.reason, s, SETTLEMENT if daily(s) else NAV_TICK, r.raw or b"", r.detail)
        for s, r, source in refused
    ] + oversize_rejects(collected.oversize)
    before = dead_letter_counts()
    async with Publisher(kafka_settings) as publisher:
        sinks = {s: nav_sink(s, f"vinter.nav:{s}", publisher, kafka_settings) for s in SAMPLES}
        for symbol, refusal in collected.whole:
            if not daily(symbol):
                await sinks[symbol].dead_letter(refusal.raw or b"", refusal, REST_SOURCE)
        for symbol, refusal in collected.refused:
            if not daily(symbol):
                await sinks[symbol].page([], [refusal], 0.0, source=REST_SOURCE)
        for event in collected.oversize:
            await publisher.publish(event)
        await publisher.flush(60)
    letters = [
        dead_letter(
            source=source,
            raw=r.raw or b"",
            reason=r.reason,
            detail=r.detail,
            key=s,
            event_type=SETTLEMENT,
            max_bytes=RECORD_LIMIT,
        )
        for s, r, source in refused
        if daily(s)
    ]
    topic = kafka_settings.topics.settlements
    transactions = Transactions(kafka_settings, f"gen-{uuid.uuid4().hex[:8]}", name="rejects")
    await transactions.start([topic])
    try:
        for at in range(0, len(letters), PER_TRANSACTION):
            await transactions.commit([(topic, e) for e in letters[at : at + PER_TRANSACTION]], [])
    finally:
        await transactions.close()
    await arrive_once(kafka_settings, expected, before)


async def test_vwap_rejects_reach_the_dead_letter_topic(kafka_settings: KafkaSettings) -> None:
    """Undecodable bytes included: the source decodes what the gRPC receiver hands on."""
    collected = Collected(Tally("vwap"))

    def each(raw: bytes) -> None:
        collected.take(len(raw), VWAP_SOURCE, [vwap_outcome(raw)])

    run(vwap_inputs(), each)
    collected.counted()
    assert collected.tally.reasons["undecodable"] > 0, collected.tally
    expected = [
        Reject(VWAP_SOURCE, r.reason, None, VWAP_TICK, r.raw or b"", r.detail)
        for _, r in collected.refused
    ] + oversize_rejects(collected.oversize)
    before = dead_letter_counts()
    async with Publisher(kafka_settings) as publisher:
        sink = VwapSink(VWAP_SOURCE, publisher, MarkBook(kafka_settings.topics.vwap_ticks))
        await sink.take([refusal for _, refusal in collected.refused])
        for event in collected.oversize:
            await publisher.publish(event)
        await publisher.flush(60)
    await arrive_once(kafka_settings, expected, before)
