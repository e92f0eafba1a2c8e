"""Exact values: revisions of a NAV tick, records Kafka would refuse, inputs bounded in bytes,
a dead-letter topic that cannot be written, and gap checks that ignore jitter. Real Kafka,
the simulators over real sockets."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import itertools
import logging
import os
import resource
import uuid
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from prometheus_client import REGISTRY
from pydantic import SecretStr

from bridge.backoff import Backoff
from bridge.config import KafkaSettings, SettlementSettings
from bridge.errors import BadRecord
from bridge.kafka import admin_client, ensure_topics
from bridge.normalize.nav import MAX_REFUSED_PER_INPUT, mark_of
from bridge.publish import Publisher
from bridge.sources.nav_ws import NavSocketSource
from bridge.sources.settlement import SettlementPoller
from bridge.sources.vinter_rest import VinterRest
from bridge.sources.vwap_grpc import VwapSource
from bridge.sources.worker import Worker
from bridge.state import Checkpointer, MarkBook, recover
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import VinterSim
from bridgedev.sim.vinter_data import Frequency, SimClock
from tests.integration.test_nav_ws import KEY, TOKEN, rest_client, supervised, vinter
from tests.integration.test_vwap_source import INSTRUMENTS, WILDCARD, kaiko_settings, running
from tests.kafkautil import read_topic, schema_error, values, wait_for
from tests.malformed import DOC_TS_EVENT, DOC_VWAP, vwap_message
from tests.samples import nav_event

pytestmark = pytest.mark.integration

DAILY, REAL_TIME = "vnfa-btca-15-d", "vnfa-btca-15-r"
TWO_MB = 2_000_000


def make_sim(symbols: list[str], **kwargs: Any) -> VinterSim:
    return VinterSim(symbols, token=TOKEN, api_key=KEY, seed=7, **kwargs)


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@dataclass
class NavRig:
    """A Vinter simulator, its REST client, a publisher and a book: NAV sockets to start."""

    sim: VinterSim
    rest: VinterRest
    publisher: Publisher
    book: MarkBook
    receiver: Worker

    @contextlib.asynccontextmanager
    async def socket(
        self, symbol: str = REAL_TIME, *, book: MarkBook | None = None, **settings: Any
    ) -> AsyncIterator[NavSocketSource]:
        """One supervised source whose socket is open; the publisher flushed on the way out."""
        source = NavSocketSource(
            symbol,
            vinter(self.sim, **settings),
            self.publisher,
            book or self.book,
            self.rest,
            receiver=self.receiver,
        )
        async with supervised([source]):
            await self.sim.wait_sockets(1, symbol)
            yield source
        await self.publisher.flush(30)


@contextlib.asynccontextmanager
async def nav_rig(
    kafka: KafkaSettings, receiver: Worker, symbols: list[str], **sim: Any
) -> AsyncIterator[NavRig]:
    async with (
        make_sim(symbols, **sim) as simulator,
        rest_client(simulator) as rest,
        Publisher(kafka) as publisher,
    ):
        yield NavRig(simulator, rest, publisher, MarkBook(kafka.topics.nav_ticks), receiver)


async def dead_letters(kafka: KafkaSettings, count: int, idle: float = 1.0) -> list[dict[str, Any]]:
    docs = values(
        await read_topic(kafka.bootstrap_servers, kafka.topics.dlq, until=count, idle=idle)
    )
    for doc in docs:
        assert schema_error(doc) is None
    return docs


async def nav_ticks(kafka: KafkaSettings, count: int, idle: float = 1.0) -> list[dict[str, Any]]:
    return values(
        await read_topic(kafka.bootstrap_servers, kafka.topics.nav_ticks, until=count, idle=idle)
    )


# -- revisions ---------------------------------------------------------------------------------


async def test_indicative_then_official_then_corrected_are_three_revisions_across_restarts(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    """A daily symbol's socket pushes an `id == 0` value, then the official value of the same
    timestamp, then a correction (later `updated_at`); a re-send of the correction is dropped.
    The bridge restarts between each (marks and versions recovered from Kafka)."""
    topic = kafka_settings.topics.nav_ticks
    async with nav_rig(kafka_settings, nav_receiver, [DAILY]) as rig:
        sim, publisher = rig.sim, rig.publisher
        async with rig.socket(DAILY) as source:
            indicative = sim.add_unofficial(DAILY)
            await wait_for(lambda: source.published == 1)
        await Checkpointer(kafka_settings, publisher, [rig.book]).checkpoint()

        book = await recover(kafka_settings, topic, mark_of)  # checkpoint + log
        async with rig.socket(DAILY, book=book) as source:
            [official] = sim.append(DAILY, 1)
            await wait_for(lambda: source.published == 1)

        book = await recover(kafka_settings, topic, mark_of)  # an older checkpoint + log
        async with rig.socket(DAILY, book=book) as source:
            correction = sim.correct(DAILY, str(official["date"]), close=official["close"] + 1)
            await wait_for(lambda: source.published == 1)
            sim.send_raw(DAILY, orjson.dumps(correction))  # the same correction again
            sim.send_raw(DAILY, orjson.dumps(official))  # and what it superseded
            await wait_for(lambda: source.duplicates == 2)
            assert source.revisions == 1

    docs = await nav_ticks(kafka_settings, 3)
    assert len(docs) == 3
    ts = indicative["timestamp"]
    assert official["timestamp"] == correction["timestamp"] == ts
    assert [d["id"] for d in docs] == [f"nav:{DAILY}:{ts}:{n}" for n in (1, 2, 3)]
    data = [d["data"] for d in docs]
    assert [(d["revision"], d["supersedes"]) for d in data] == [(1, None), (2, 1), (3, 2)]
    assert [d["official"] for d in data] == [False, True, True]
    assert [d["close"] for d in data] == [
        indicative["close"],
        official["close"],
        correction["close"],
    ]
    assert data[2]["updated_at"] == correction["updated_at"] > official["updated_at"]
    for doc in docs:
        assert schema_error(doc) is None


# -- records Kafka would refuse ------------------------------------------------------------


async def test_a_2mb_nav_record_is_a_too_large_dead_letter_live_and_back_filled(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    """Incompressible padding (an upstream field the bridge keeps verbatim) makes a record of
    2 MB: over the socket and through the REST back-fill, it becomes a `too_large` dead
    letter with its symbol and size, and the records around it arrive."""
    before = counted("bridge_too_large_total", source="/vinter/nav/ws")
    async with nav_rig(kafka_settings, nav_receiver, [REAL_TIME]) as rig:
        sim = rig.sim
        async with rig.socket() as source:
            sim.append(REAL_TIME, 3)
            sim.append(REAL_TIME, 1, extra_bytes=TWO_MB)
            sim.append(REAL_TIME, 3)
            await wait_for(lambda: source.published == 7, timeout=20)
        # no socket: these wait upstream, and come through the REST back-fill
        sim.append(REAL_TIME, 2)
        sim.append(REAL_TIME, 1, extra_bytes=TWO_MB)
        sim.append(REAL_TIME, 2)
        async with rig.socket() as source:
            await wait_for(lambda: source.backfilled == 5, timeout=20)

    ticks = await nav_ticks(kafka_settings, 10)
    stamps = [r["timestamp"] for r in sim.history(REAL_TIME)]
    padded = [r["timestamp"] for r in sim.history(REAL_TIME) if "note" in r]
    assert [d["data"]["timestamp"] for d in ticks] == [t for t in stamps if t not in padded]
    letters = await dead_letters(kafka_settings, 2)
    assert [d["data"]["reason"] for d in letters] == ["too_large", "too_large"]
    for letter, source_name in zip(letters, ("/vinter/nav/ws", "/vinter/nav/rest"), strict=True):
        data = letter["data"]
        assert data["key"] == REAL_TIME
        assert data["source"] == source_name
        assert "kafka.max_record_bytes" in data["detail"]
        assert "bytes kept" in data["detail"]
        assert len(letter["data"]["raw"]) < 200_000  # the start of its input, not all of it
    assert counted("bridge_too_large_total", source="/vinter/nav/ws") == before + 1


async def test_a_2mb_vwap_response_is_a_too_large_dead_letter(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    async with KaikoSim(
        api_key="kaiko-SENTINEL", instruments=INSTRUMENTS, aggregates=("1s",), rate=200, seed=3
    ) as sim:
        huge = vwap_message(
            {**DOC_VWAP, "exchange": "test", "sequence_id": uuid.uuid4().hex * (TWO_MB // 32)},
            DOC_TS_EVENT,
        )
        settings = kaiko_settings(sim, tmp_path, api_key="kaiko-SENTINEL")
        async with Publisher(kafka_settings) as publisher:
            source = VwapSource(WILDCARD, settings, publisher, MarkBook("t"))
            async with running(source):
                await wait_for(lambda: publisher.published >= 30, timeout=20)
                sim.inject(huge)
                await wait_for(lambda: sim.injected_sent == 1, timeout=20)
                floor = publisher.published
                await wait_for(lambda: publisher.published >= floor + 30, timeout=20)
            await publisher.flush(30)
    [letter] = await dead_letters(kafka_settings, 1)
    assert letter["data"]["reason"] == "too_large"
    assert letter["data"]["key"] == "test:spot:eth-usdt"


async def test_a_grpc_message_over_the_limit_is_a_too_large_dead_letter(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    """gRPC ends the call (RESOURCE_EXHAUSTED); the bridge says so and subscribes again."""
    async with KaikoSim(
        api_key="kaiko-SENTINEL", instruments=INSTRUMENTS, aggregates=("1s",), rate=200, seed=4
    ) as sim:
        big = vwap_message({**DOC_VWAP, "sequence_id": "s" * 100_000}, DOC_TS_EVENT)
        settings = kaiko_settings(sim, tmp_path, api_key="kaiko-SENTINEL").model_copy(
            update={"max_message_bytes": 64 * 1024}
        )
        async with Publisher(kafka_settings) as publisher:
            source = VwapSource(WILDCARD, settings, publisher, MarkBook("t"))
            async with running(source):
                await wait_for(lambda: publisher.published >= 20, timeout=20)
                sim.inject(big)
                await wait_for(lambda: source.sessions >= 2, timeout=20)
                floor = publisher.published
                await wait_for(lambda: publisher.published >= floor + 20, timeout=20)
            await publisher.flush(30)
    [letter] = await dead_letters(kafka_settings, 1)
    assert letter["data"]["reason"] == "too_large"
    assert "kaiko.max_message_bytes" in letter["data"]["detail"]
    assert "kaiko-SENTINEL" not in orjson.dumps(letter).decode()


async def test_a_2mb_daily_record_is_a_too_large_dead_letter_and_the_others_settle(
    kafka_settings: KafkaSettings,
) -> None:
    names = ["vnfa-big-d", "vnfa-small-d"]
    clock = SimClock(start=datetime.now(UTC) - timedelta(days=10))
    async with make_sim(names, clock=clock) as sim:
        sim.append(names[0], 2)
        sim.append(names[0], 1, extra_bytes=TWO_MB)
        sim.append(names[0], 2)
        sim.append(names[1], 5)
        settings = SettlementSettings(symbols=names, transactional_id=f"s-{uuid.uuid4().hex[:8]}")
        async with (
            VinterRest(sim.base_url, SecretStr(KEY), backoff=Backoff(initial=0.01)) as rest,
            SettlementPoller(settings, kafka_settings, rest) as poller,
        ):
            report = await poller.poll()
            assert (report.settlements, report.dead_letters) == (9, 1)
            again = await poller.poll()  # the refusal is remembered: not dead-lettered twice
            assert (again.settlements, again.dead_letters) == (0, 0)
    [letter] = await dead_letters(kafka_settings, 1)
    assert (letter["data"]["reason"], letter["data"]["key"]) == ("too_large", names[0])


async def test_a_batch_kafka_refuses_as_too_large_is_split_and_the_rest_delivered(
    kafka_settings: KafkaSettings,
) -> None:
    """The topic's `max.message.bytes` shrinks under a running publisher: batches over it
    are split until they fit, and an event that alone is over it is dead-lettered."""
    topic = kafka_settings.topics.nav_ticks
    settings = kafka_settings.model_copy(update={"linger_ms": 200})
    async with Publisher(settings) as publisher:
        admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
        await admin.start()
        try:
            limit = {"max.message.bytes": "40000"}
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, limit)])
            async with asyncio.timeout(30):  # the broker applies it a moment later
                while await _max_message_bytes(admin, topic) != "40000":  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
        finally:
            await admin.close()
        sent = []
        for i in range(30):  # 5 KB each, random: one partition, a batch of 150 KB
            event = nav_event("vnfa-split-r", 1_700_000_000_000 + i)
            event.data["extra"] = {"note": base64.b64encode(os.urandom(3600)).decode()}
            sent.append(event.id)
            await publisher.publish(event)
        alone = nav_event("vnfa-split-r", 1_700_000_001_000)
        alone.data["extra"] = {"note": base64.b64encode(os.urandom(36_000)).decode()}  # 48 KB
        await publisher.publish(alone)
        await publisher.flush(60)
    docs = await nav_ticks(kafka_settings, 30)
    assert [d["id"] for d in docs] == sent
    [letter] = await dead_letters(kafka_settings, 1)
    assert (letter["data"]["reason"], letter["data"]["key"]) == ("too_large", "vnfa-split-r")


async def _max_message_bytes(admin: AIOKafkaAdminClient, topic: str) -> str | None:
    resource = ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": None})
    [response] = await admin.describe_configs([resource])
    entries = response.resources[0][4]
    return next((str(e[1]) for e in entries if e[0] == "max.message.bytes"), None)


# -- inputs bounded in bytes ---------------------------------------------------------------


async def test_a_websocket_message_over_the_limit_is_a_too_large_dead_letter(
    kafka_settings: KafkaSettings, nav_receiver: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    """websockets closes the socket with 1009; the bridge says so (dead letter, warning,
    counter), opens it again, and the records after it arrive."""
    name = f"vinter.nav:{REAL_TIME}"
    before = counted("bridge_too_large_total", source=name)
    async with nav_rig(kafka_settings, nav_receiver, [REAL_TIME]) as rig:
        sim = rig.sim
        with caplog.at_level(logging.WARNING):
            async with rig.socket(max_message_bytes=64 * 1024) as source:
                sim.append(REAL_TIME, 2)
                await wait_for(lambda: source.published == 2)
                sim.send_raw(REAL_TIME, "x" * 100_000)
                await wait_for(lambda: source.sessions == 2, timeout=20)
                await sim.wait_sockets(1, REAL_TIME)
                sim.append(REAL_TIME, 2)
                await wait_for(lambda: source.published == 4)
    [letter] = await dead_letters(kafka_settings, 1)
    data = letter["data"]
    assert (data["reason"], data["key"], data["source"]) == ("too_large", REAL_TIME, name)
    assert "100000 bytes" in data["detail"]
    assert "vinter.max_message_bytes" in caplog.text
    assert counted("bridge_too_large_total", source=name) == before + 1


async def test_a_message_of_100000_bad_records_costs_a_bounded_number_of_dead_letters(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    async with (
        nav_rig(kafka_settings, nav_receiver, [REAL_TIME]) as rig,
        rig.socket() as source,
    ):
        rig.sim.send_raw(REAL_TIME, orjson.dumps([{"symbol": REAL_TIME}] * 100_000))
        rig.sim.append(REAL_TIME, 1)
        await wait_for(lambda: source.published == 1, timeout=30)
    kept = MAX_REFUSED_PER_INPUT
    letters = await dead_letters(kafka_settings, kept + 1, idle=2.0)
    assert len(letters) == kept + 1
    reasons = [d["data"]["reason"] for d in letters]
    assert reasons == ["missing_field"] * kept + ["too_many_bad_records"]
    assert f"{100_000 - kept} more bad records" in letters[-1]["data"]["detail"]
    assert letters[-1]["data"]["raw"].startswith(f'[{{"symbol":"{REAL_TIME}"}}')


async def test_a_rest_body_over_the_limit_and_a_gzip_bomb_are_refused() -> None:
    limit = 1 << 20
    bomb = zlib.compressobj(wbits=31)  # gzip
    chunk = b" " * (1 << 20)
    body = b"".join(bomb.compress(chunk) for _ in range(1024)) + bomb.flush()  # 1 GiB
    assert len(body) < 2 << 20
    async with make_sim([REAL_TIME]) as sim:
        sim.rest_raw[Frequency.REAL_TIME] = [
            b"[" + b"0," * limit + b"0]",
            (body, {"Content-Encoding": "gzip"}),
            (
                gzip.compress(orjson.dumps({"result": "success", "data": []})),
                {"Content-Encoding": "gzip"},
            ),
        ]
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        async with VinterRest(sim.base_url, SecretStr(KEY), max_body_bytes=limit) as rest:
            for _ in range(2):
                with pytest.raises(BadRecord) as caught:
                    await rest.fetch("real-time", REAL_TIME)
                assert caught.value.reason == "too_large"
                assert "vinter.max_body_bytes" in caught.value.detail
                assert caught.value.raw is not None
                assert len(caught.value.raw) <= limit
            assert await rest.fetch("real-time", REAL_TIME) == []  # a small gzip body is fine
        grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    assert grown_kib < 200 * 1024, f"reading the bomb grew the process by {grown_kib} KiB"


# -- a dead-letter topic that cannot be written ------------------------------------------------


async def test_good_events_flow_while_the_dead_letter_topic_is_gone(
    kafka_settings: KafkaSettings,
) -> None:
    settings = kafka_settings.model_copy(update={"request_timeout_ms": 5000, "dlq_buffer": 50})
    dlq = settings.topics.dlq
    async with Publisher(settings) as publisher:
        async with admin_client(settings) as admin:
            await admin.delete_topics([dlq])
            # the deletion is done once the broker no longer lists the topic: until then it
            # may still take the dead letters
            async with asyncio.timeout(30):
                while dlq in await admin.list_topics():  # noqa: ASYNC110 - polls the broker
                    await asyncio.sleep(0.1)
        for i in range(3):
            await publisher.dead_letter(source="test", raw=f"bad {i}", reason="bad_json")
        for i in range(200):
            await publisher.publish(nav_event("vnfa-good-r", 1_700_000_000_000 + i))
        await wait_for(lambda: publisher.published >= 200, timeout=60)
        await wait_for(lambda: publisher.dead_letter_trouble is not None, timeout=60)
        trouble = publisher.dead_letter_trouble
        assert trouble is not None
        assert f"3 dead letters wait for topic {dlq}" in trouble
        await ensure_topics(settings, [dlq])
        await wait_for(lambda: publisher.dead_letter_trouble is None, timeout=90)
        await publisher.flush(60)
    letters = await dead_letters(settings, 3)
    assert sorted(d["data"]["raw"] for d in letters) == ["bad 0", "bad 1", "bad 2"]


# -- gap checks --------------------------------------------------------------------------------


async def test_jitter_in_a_fast_real_time_feed_makes_no_rest_calls(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    """Records every 10 ms whose timestamps jitter by up to 9 ms: steps of 1 to 19 ms."""
    clock = SimClock(steps={Frequency.REAL_TIME: timedelta(milliseconds=10)})
    async with nav_rig(kafka_settings, nav_receiver, [REAL_TIME], clock=clock, jitter_ms=9) as rig:
        sim = rig.sim
        async with rig.socket() as source:
            for _ in range(60):
                sim.append(REAL_TIME, 5)
                await asyncio.sleep(0.05)  # the upstream's pace
            await wait_for(lambda: source.published == 300, timeout=30)
        stamps = [r["timestamp"] for r in sim.history(REAL_TIME)]
    steps = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    assert max(steps) > 3 * min(steps)  # the jitter is there
    assert source.gap_checks == 0
    assert sim.rest_requests.total() == 1  # where the new symbol starts; no gap check
