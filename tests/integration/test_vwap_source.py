"""The VWAP source against the gRPC simulator over TLS and a real broker.

Each test runs the source the way the service does, under `keep_running`, and checks what
reached Kafka against what the simulator says it sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest

from bridge import validation
from bridge.backoff import Backoff
from bridge.config import KafkaSettings, KaikoSettings, VwapSubscription
from bridge.errors import ConfigError
from bridge.normalize.vwap import mark_of
from bridge.publish import Publisher
from bridge.sources.vwap_grpc import VwapSource, channel_options
from bridge.state import PARTS, Checkpointer, MarkBook, recover
from bridge.supervisor import SourceState, keep_running
from bridgedev.sim.kaiko import KaikoSim, SentRecord
from tests.kafkautil import read_topic, values, wait_for

pytestmark = pytest.mark.integration

API_KEY = "sim-api-key-0d5e"
INSTRUMENTS = (
    ("cbse", "spot", "btc-usd"),
    ("binc", "spot", "btc-usdt"),
    ("binc", "spot", "eth-usdt"),
)
WILDCARD = VwapSubscription(exchange="*", instrument_class="spot", code="*", aggregate="1s")


@pytest.fixture
async def sim() -> AsyncIterator[KaikoSim]:
    async with KaikoSim(
        api_key=API_KEY, instruments=INSTRUMENTS, aggregates=("1s",), rate=400, seed=11
    ) as simulator:
        yield simulator


def kaiko_settings(sim: KaikoSim, tmp_path: Path, *, api_key: str = API_KEY) -> KaikoSettings:
    ca_file = tmp_path / "kaiko-ca.pem"
    sim.write_ca(ca_file)
    return KaikoSettings(target=sim.target, api_key=api_key, ca_file=ca_file, stale_after_s=20)


@contextlib.asynccontextmanager
async def running(source: VwapSource, **kwargs: Any) -> AsyncIterator[SourceState]:
    """The source under the supervisor, as a task; cancelled and awaited on the way out."""
    state = SourceState(source.name)
    backoff = Backoff(initial=0.05, cap=0.5)  # fast reconnects keep the tests short
    task = asyncio.create_task(keep_running(source, state=state, backoff=backoff, **kwargs))
    try:
        yield state
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def key_of(rec: SentRecord) -> str:
    return f"{rec.exchange}:{rec.instrument_class}:{rec.code}"


def tick_id(rec: SentRecord) -> str:
    return f"vwap:{key_of(rec)}:{rec.aggregate}:{rec.uid}"


async def drain(sim: KaikoSim, publisher: Publisher, source: VwapSource) -> list[SentRecord]:
    """Stop the simulator sending, wait until the source has handled and Kafka acknowledged
    everything it sent; returns what the simulator sent."""
    sim.stall()
    await wait_for(
        lambda: (
            source.duplicates + publisher.published - source.gaps >= len(sim.sent)
            and publisher.pending == 0
        ),
        timeout=20,
    )
    return sim.sent


async def read_vwap(settings: KafkaSettings, count: int) -> list[Any]:
    return await read_topic(
        settings.bootstrap_servers, settings.topics.vwap_ticks, until=count, idle=0.5, timeout=30
    )


def by_type(docs: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["type"] == event_type]


async def test_wildcard_every_message_once_keyed_and_in_order(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, kaiko_settings(sim, tmp_path), publisher, MarkBook(topic))
        assert source.name == "kaiko.vwap:*:spot:*:1s"
        async with running(source):
            await wait_for(lambda: publisher.published >= 300, timeout=20)
            sent = await drain(sim, publisher, source)

    records = await read_vwap(kafka_settings, len(sent))
    assert len(records) == len(sent)
    assert len(sim.streams) == 1
    assert source.duplicates == source.gaps == source.bad_records == 0
    per_key: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    prices: dict[str, float] = {}
    for record in records:
        doc = orjson.loads(record.value)
        assert validation.first_error(doc["type"], 1, doc) is None
        data = doc["data"]
        key = f"{data['exchange']}:{data['instrument_class']}:{data['code']}"
        assert record.key.decode() == doc["subject"] == key
        assert dict(record.headers)["event-type"] == b"kaiko.vwap.tick"
        per_key[key].append(data["uid"])
        partitions[key].add(record.partition)
        prices[doc["id"]] = data["price"]
        assert data["ts_event_ns"] % 1_000_000_000 == int(data["ts_event"][20:29])
    expected: dict[str, list[str]] = defaultdict(list)
    for rec in sent:
        expected[key_of(rec)].append(rec.uid)
    assert set(per_key) == {":".join(i) for i in INSTRUMENTS}
    assert per_key == expected  # every message once, in the order sent, per key
    assert all(len(p) == 1 for p in partitions.values())
    assert prices == {tick_id(rec): rec.price for rec in sent}


async def test_unavailable_abort_resubscribes_without_duplicates_and_reports_one_gap(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    sim.resend_on_reconnect = 4  # the gateway repeats recent intervals on a new stream
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, kaiko_settings(sim, tmp_path), publisher, MarkBook(topic))
        async with running(source) as state:
            await wait_for(lambda: publisher.published >= 60, timeout=20)
            sim.abort_next(grpc.StatusCode.UNAVAILABLE)
            await wait_for(lambda: len(sim.streams) >= 2 and len(sim.streams[1].sent) >= 90)
            sent = await drain(sim, publisher, source)
            assert state.attempts == 2
            assert "UNAVAILABLE" in state.last_error

    assert sim.streams[0].status == grpc.StatusCode.UNAVAILABLE
    unique = list(dict.fromkeys(tick_id(rec) for rec in sent))
    docs = values(await read_vwap(kafka_settings, len(unique) + len(INSTRUMENTS)))
    ticks = by_type(docs, "kaiko.vwap.tick")
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)), "no duplicate ids in Kafka"
    assert sorted(d["id"] for d in ticks) == sorted(unique)
    assert source.duplicates == len(sent) - len(unique) > 0  # the resends were dropped

    gaps = by_type(docs, "bridge.gap")
    assert len(gaps) == len(INSTRUMENTS) == source.gaps  # exactly one per affected key
    first_stream = sim.streams[0].sent
    for gap in gaps:
        assert validation.first_error("bridge.gap", 1, gap) is None
        key = gap["subject"]
        before = [r.uid for r in first_stream if key_of(r) == key]
        after = [r.uid for r in sim.streams[1].sent if key_of(r) == key and r.uid > before[-1]]
        assert gap["data"]["reason"] == "reconnect"
        assert gap["data"]["aggregate"] == "1s"
        assert gap["data"]["last_before"] == before[-1]
        assert gap["data"]["first_after"] == after[0]
        # the gap precedes the first interval after it in the key's partition
        order = [d["id"] for d in docs if d["subject"] == key]
        assert order.index(gap["id"]) == order.index(f"vwap:{key}:1s:{after[0]}") - 1


async def test_refused_key_is_reported_once_and_never_logged(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sentinel = "SENTINEL-kaiko-key-7Qx93vB"
    caplog.set_level(logging.DEBUG)
    for name in ("grpc", "grpc._cython.cygrpc", "grpc.aio", "bridge"):
        caplog.set_level(logging.DEBUG, logger=name)
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        settings = kaiko_settings(sim, tmp_path, api_key=sentinel)
        source = VwapSource(WILDCARD, settings, publisher, MarkBook(topic))
        async with running(source) as state:  # default auth_retry_s: 300 s
            await wait_for(lambda: state.parked, timeout=10)
            await asyncio.sleep(3)  # the window in which a hot retry loop would show
            assert sim.subscribe_calls == sim.unauthenticated == 1
    assert publisher.published == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert source.name in message
    assert "UNAUTHENTICATED" in message
    assert "kaiko.api_key" in message
    assert "next attempt in 300s" in message
    assert sentinel not in caplog.text
    assert all(sentinel not in r.getMessage() for r in caplog.records)
    assert sentinel not in state.last_error
    assert sentinel not in repr(source)


async def test_sigkill_and_restart_no_duplicates(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    """Recovery from Kafka (checkpoint + the log after it) de-duplicates the resends."""
    sim.resend_on_reconnect = 8
    settings = kaiko_settings(sim, tmp_path)
    topic = kafka_settings.topics.vwap_ticks

    # First life: a checkpoint midway, more events after it, then an abrupt end.
    book = MarkBook(topic)
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, settings, publisher, book)
        checkpointer = Checkpointer(kafka_settings, publisher, [book], interval_s=3600)
        async with running(source):
            await wait_for(lambda: publisher.published >= 90, timeout=20)
            assert await checkpointer.checkpoint() == 1
            at_checkpoint = book.snapshot()
            # more after the checkpoint (counted from it: the checkpoint itself takes a while)
            floor = publisher.published
            await wait_for(lambda: publisher.published >= floor + 90, timeout=20)
        # cancelled mid-stream; no final checkpoint (the publisher still delivers what it took)
    assert book.snapshot() != at_checkpoint
    first_life = publisher.published - PARTS  # less the checkpoint's parts (state topic)

    # Second life: marks from Kafka, a new source; the gateway re-sends recent intervals.
    recovered = await recover(kafka_settings, topic, mark_of)
    assert recovered.snapshot().keys() == book.snapshot().keys()
    # (a cancel can land between a send and its mark: Kafka may be one interval ahead)
    assert all(recovered.get(k) >= mark for k, mark in book.snapshot().items())  # type: ignore[operator]
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, settings, publisher, recovered)
        async with running(source):
            await wait_for(lambda: len(sim.streams) >= 2 and len(sim.streams[-1].sent) >= 90)
            sim.stall()
            await wait_for(
                lambda: (
                    source.duplicates + publisher.published - source.gaps
                    >= len(sim.streams[-1].sent)
                    and publisher.pending == 0
                ),
                timeout=20,
            )
    assert source.duplicates >= len(INSTRUMENTS)  # the resends were recognised
    second_life = publisher.published

    # the whole topic: the first life's count can be one short of what reached Kafka
    records = await read_topic(kafka_settings.bootstrap_servers, topic, timeout=30)
    assert len(records) >= first_life + second_life
    docs = values(records)
    ids = [d["id"] for d in docs]
    duplicated = [i for i, n in Counter(ids).items() if n > 1]
    assert not duplicated, f"duplicate ids after restart: {duplicated[:5]}"
    ticks = by_type(docs, "kaiko.vwap.tick")
    assert {d["id"] for d in ticks} >= {tick_id(r) for r in sim.streams[-1].sent}
    for key in {d["subject"] for d in ticks}:
        uids = [d["data"]["uid"] for d in ticks if d["subject"] == key]
        assert uids == sorted(uids), "in order per key across the restart"
    gaps = by_type(docs, "bridge.gap")  # the restart is an outage too: one gap per key
    assert sorted(g["subject"] for g in gaps) == sorted(":".join(i) for i in INSTRUMENTS)
    assert {g["data"]["reason"] for g in gaps} == {"restart"}


async def test_silent_stream_is_resubscribed(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    settings = kaiko_settings(sim, tmp_path).model_copy(update={"stale_after_s": 0.5})
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, settings, publisher, MarkBook(topic))
        assert source.stale_after_s == 2.0  # never less than two intervals of the aggregate
        async with running(source) as state:
            await wait_for(lambda: publisher.published >= 30, timeout=20)
            sim.stall()  # the connection stays up and answers pings; only data stops
            await wait_for(lambda: len(sim.streams) >= 2, timeout=10)
            assert "stream stalled: no message for 2s" in state.last_error
            assert sim.streams[0].status == grpc.StatusCode.CANCELLED  # we hung up
            sim.unstall()
            published = publisher.published
            await wait_for(lambda: publisher.published >= published + 30, timeout=20)


async def test_retriable_refusal_is_retried(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    sim.fail_subscribe(grpc.StatusCode.RESOURCE_EXHAUSTED, times=2, details="rate limited")
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, kaiko_settings(sim, tmp_path), publisher, MarkBook(topic))
        async with running(source) as state:
            await wait_for(lambda: publisher.published >= 10, timeout=20)
            assert state.attempts == 3
            assert not state.parked
            assert "RESOURCE_EXHAUSTED: rate limited" in state.last_error


async def refused(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path, sub: VwapSubscription
) -> SourceState:
    """Run a source until the supervisor parks it; return its state."""
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(sub, kaiko_settings(sim, tmp_path), publisher, MarkBook(topic))
        async with running(source, auth_retry_s=60) as state:
            await wait_for(lambda: state.parked, timeout=10)
    assert sim.subscribe_calls == 1
    assert source.name in state.last_error
    return state


async def test_invalid_request_is_parked_naming_the_subscriptions(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    five_minutes = WILDCARD.model_copy(update={"aggregate": "5m"})  # the gateway has none
    state = await refused(kafka_settings, sim, tmp_path, five_minutes)
    assert sim.invalid_requests == 1
    assert "INVALID_ARGUMENT" in state.last_error
    assert "check the setting kaiko.subscriptions" in state.last_error


async def test_permission_denied_is_parked_naming_the_key(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    sim.fail_subscribe(grpc.StatusCode.PERMISSION_DENIED, times=None, details="not entitled")
    state = await refused(kafka_settings, sim, tmp_path, WILDCARD)
    assert "PERMISSION_DENIED: not entitled" in state.last_error
    assert "check the setting kaiko.api_key" in state.last_error


def test_keepalive_and_stall_limit_follow_the_aggregate(tmp_path: Path) -> None:
    settings = KaikoSettings(target="127.0.0.1:1", api_key=API_KEY, stale_after_s=30)
    unstarted = Publisher(KafkaSettings())  # building a source connects nothing

    def source(sub: VwapSubscription, kaiko: KaikoSettings = settings) -> VwapSource:
        return VwapSource(sub, kaiko, unstarted, MarkBook("t"))

    fast = dict(channel_options("1s"))
    slow = dict(channel_options("1h"))
    assert fast["grpc.keepalive_time_ms"] == 60_000
    assert slow["grpc.keepalive_time_ms"] >= 300_000  # servers' default minimum without data
    assert fast["grpc.keepalive_permit_without_calls"] == 0
    assert source(WILDCARD).stale_after_s == 30
    assert source(WILDCARD.model_copy(update={"aggregate": "1h"})).stale_after_s == 7200
    with pytest.raises(ConfigError, match=r"kaiko\.api_key"):
        source(WILDCARD, settings.model_copy(update={"api_key": None}))
    with pytest.raises(ConfigError, match=r"kaiko\.ca_file"):
        source(WILDCARD, settings.model_copy(update={"ca_file": tmp_path / "absent.pem"}))
