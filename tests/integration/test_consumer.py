"""EventReader against a real broker: positions by time, offset and group, end bounds,
read_committed, version dispatch, de-duplication and bad records."""

from __future__ import annotations

import asyncio
import copy
import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from bridge import events, validation
from bridge.config import KafkaSettings
from bridge.consumer import ConsumedEvent, EventReader, KafkaRecord, NavTick
from bridge.errors import BadRecord, ConfigError
from tests.conftest import NewTopic
from tests.kafkautil import read_topic
from tests.samples import nav_event

pytestmark = pytest.mark.integration

SYMBOLS = ["vnfa-btca-15-r", "vnfa-etha-10-r", "vnfa-sola-5-r"]
T0 = 1_700_000_000_000
PER_SYMBOL = 20
WAIT_S = 60.0
# The records carry 2023 timestamps: under the broker's time-based retention they would be
# deleted at its next check (every minute), in the middle of a test.
KEEP_OLD = {"retention.ms": "-1"}

Item = tuple[bytes | None, str, Sequence[tuple[str, bytes]]]


def at(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def produce(
    bootstrap: str, topic: str, items: Iterable[Item], *, timestamps: Iterable[int] | None = None
) -> None:
    """Raw records (value, key, headers), in order, with explicit timestamps if given."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        stamps = iter(timestamps) if timestamps is not None else None
        sent = [
            await producer.send(
                topic,
                value=value,
                key=key.encode(),
                headers=list(headers),
                timestamp_ms=next(stamps) if stamps is not None else None,
            )
            for value, key, headers in items
        ]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


def nav_item(symbol: str, ts: int, value: float = 100.0) -> Item:
    event = nav_event(symbol, ts, value)
    return event.to_json(), event.key, event.headers()


async def ticks_with_timestamps(bootstrap: str, topic: str) -> None:
    """PER_SYMBOL ticks per symbol, the Kafka timestamp of each = its upstream timestamp."""
    stamps = [T0 + i * 1000 for i in range(PER_SYMBOL) for _ in SYMBOLS]
    items = [nav_item(s, T0 + i * 1000) for i in range(PER_SYMBOL) for s in SYMBOLS]
    await produce(bootstrap, topic, items, timestamps=stamps)


async def read_all(reader: EventReader) -> list[ConsumedEvent]:
    async with asyncio.timeout(WAIT_S), reader:
        return [event async for event in reader]


def by_partition(pairs: Iterable[tuple[int, int]]) -> dict[int, list[int]]:
    """(partition, offset) pairs -> offsets per partition, in the order seen."""
    out: dict[int, list[int]] = defaultdict(list)
    for partition, offset in pairs:
        out[partition].append(offset)
    return dict(out)


async def test_start_at_a_time_and_stop_at_a_time(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=3, config=KEEP_OLD)
    bootstrap = kafka_settings.bootstrap_servers
    await ticks_with_timestamps(bootstrap, topic)
    plain = await read_topic(bootstrap, topic, until=PER_SYMBOL * len(SYMBOLS))
    start_ms, stop_ms = T0 + 12_000, T0 + 15_000

    events_ = await read_all(
        EventReader(kafka_settings, topic, start=at(start_ms), stop_at_end=True)
    )
    expected = by_partition((r.partition, r.offset) for r in plain if r.timestamp >= start_ms)
    assert by_partition((e.partition, e.offset) for e in events_) == expected
    assert all(isinstance(e, NavTick) and e.kafka_timestamp == e.timestamp for e in events_)
    assert len(events_) == (PER_SYMBOL - 12) * len(SYMBOLS)

    window = await read_all(EventReader(kafka_settings, [topic], start=at(start_ms),
                                        stop=at(stop_ms)))  # fmt: skip
    assert sorted(e.kafka_timestamp for e in window) == sorted(
        r.timestamp for r in plain if start_ms <= r.timestamp < stop_ms
    )
    assert {e.key for e in window} == set(SYMBOLS)


async def test_start_and_stop_at_offsets(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=3, config=KEEP_OLD)
    bootstrap = kafka_settings.bootstrap_servers
    await ticks_with_timestamps(bootstrap, topic)
    plain = await read_topic(bootstrap, topic, until=PER_SYMBOL * len(SYMBOLS))
    used = {r.partition for r in plain}
    got = await read_all(EventReader(kafka_settings, topic, start=5, stop=9, stop_at_end=True))
    offsets = by_partition((e.partition, e.offset) for e in got)
    assert offsets == {p: [5, 6, 7, 8] for p in used}

    # per partition, on one partition only; by key
    one = next(iter(offsets))
    got = await read_all(
        EventReader(kafka_settings, topic, start={one: 17}, partitions=[one], stop_at_end=True)
    )
    assert [e.offset for e in got] == [r.offset for r in plain if r.partition == one][17:]
    symbol = SYMBOLS[0]
    got = await read_all(EventReader(kafka_settings, topic, keys=[symbol], stop_at_end=True))
    assert [e.key for e in got] == [symbol] * PER_SYMBOL
    assert [e.timestamp for e in got if isinstance(e, NavTick)] == [
        T0 + i * 1000 for i in range(PER_SYMBOL)
    ]

    with pytest.raises(ConfigError, match="no start offset"):
        await read_all(EventReader(kafka_settings, topic, start={one: 1}, stop_at_end=True))
    with pytest.raises(ConfigError, match="no such topic"):
        await read_all(EventReader(kafka_settings, [topic, f"{topic}-absent"], stop_at_end=True))


async def test_waits_for_an_end_bound_beyond_the_log(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=1)
    bootstrap = kafka_settings.bootstrap_servers
    await produce(bootstrap, topic, [nav_item(SYMBOLS[0], T0 + i) for i in range(5)])
    reading = asyncio.create_task(read_all(EventReader(kafka_settings, topic, stop=8)))
    await asyncio.sleep(1.0)
    assert not reading.done()  # offsets 5..7 do not exist yet
    await produce(bootstrap, topic, [nav_item(SYMBOLS[0], T0 + i) for i in range(5, 10)])
    got = await reading
    assert [e.offset for e in got] == list(range(8))


async def test_resume_from_committed_offsets(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=1)
    await produce(
        kafka_settings.bootstrap_servers, topic,
        [nav_item(SYMBOLS[0], T0 + i) for i in range(10)],
    )  # fmt: skip
    group = f"{topic}-group"
    async with (
        asyncio.timeout(WAIT_S),
        EventReader(kafka_settings, topic, start="committed", group_id=group) as reader,
    ):
        first = [await anext(reader) for _ in range(4)]
        await reader.commit()
    assert [e.offset for e in first] == [0, 1, 2, 3]
    rest = await read_all(
        EventReader(kafka_settings, topic, start="committed", group_id=group, stop_at_end=True)
    )
    assert [e.offset for e in rest] == list(range(4, 10))
    with pytest.raises(ConfigError, match="group_id"):
        EventReader(kafka_settings, topic, start="committed")


async def test_read_committed_skips_aborted_transactions_and_still_ends(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=1)
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka_settings.bootstrap_servers, transactional_id=f"{topic}-tx"
    )
    await producer.start()
    try:
        for ts, commit in [(1, True), (2, False), (3, True)]:
            await producer.begin_transaction()
            value, key, headers = nav_item(SYMBOLS[0], T0 + ts)
            await producer.send_and_wait(topic, value, key=key.encode(), headers=headers)
            if commit:
                await producer.commit_transaction()
            else:
                await producer.abort_transaction()
    finally:
        await producer.stop()

    got = await read_all(EventReader(kafka_settings, topic, stop_at_end=True))
    assert [e.timestamp for e in got if isinstance(e, NavTick)] == [T0 + 1, T0 + 3]


LATEST = validation.latest_version(events.NAV_TICK)
NEXT = LATEST + 1


def write_next(root: Path) -> Path:
    """A test-only next version of vinter.nav.tick: the latest plus one optional field."""
    new = copy.deepcopy(validation.load_schema(events.NAV_TICK, LATEST))
    new["$id"] = validation.schema_id(events.NAV_TICK, NEXT)
    new["properties"]["dataschema"] = {"const": validation.schema_id(events.NAV_TICK, NEXT)}
    new["properties"]["data"]["properties"]["venue"] = {"type": ["string", "null"]}
    path = root / events.NAV_TICK / f"{NEXT}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(new), encoding="utf-8")
    return root


def nav_next_item(symbol: str, ts: int) -> Item:
    doc = nav_event(symbol, ts).envelope()
    doc["dataschema"] = validation.schema_id(events.NAV_TICK, NEXT)
    doc["data"]["venue"] = "lmax"
    return orjson.dumps(doc), symbol, events.kafka_headers(events.NAV_TICK, NEXT)


def nav_v1_item(symbol: str, ts: int) -> Item:
    """A tick as the bridge wrote it before revisions (schema version 1)."""
    doc = nav_event(symbol, ts).envelope()
    doc["dataschema"] = validation.schema_id(events.NAV_TICK, 1)
    doc["id"] = f"nav:{symbol}:{ts}"
    del doc["data"]["revision"], doc["data"]["supersedes"]
    return orjson.dumps(doc), symbol, events.kafka_headers(events.NAV_TICK, 1)


async def test_a_newer_reader_reads_older_and_newer_events(
    kafka_settings: KafkaSettings, new_topic: NewTopic, tmp_path: Path
) -> None:
    topic = await new_topic(partitions=1)
    items = [nav_v1_item(SYMBOLS[0], T0 + i) if i % 2 else nav_next_item(SYMBOLS[0], T0 + i)
             for i in range(10)]  # fmt: skip
    await produce(kafka_settings.bootstrap_servers, topic, items)
    schemas = write_next(tmp_path)

    got = await read_all(EventReader(kafka_settings, topic, schema_dirs=[schemas],
                                     stop_at_end=True))  # fmt: skip
    assert len(got) == 10
    assert all(isinstance(e, NavTick) and e.version == NEXT for e in got)
    assert [e.written_version for e in got] == [NEXT, 1] * 5
    assert [e.data.get("venue") for e in got] == ["lmax", None] * 5
    assert all(isinstance(e, NavTick) and e.revision == 1 for e in got)

    # a reader without the next schema surfaces its events, and reads the v1 ones
    bad: list[str] = []
    got = await read_all(
        EventReader(kafka_settings, topic, stop_at_end=True,
                    on_error=lambda record, error: bad.append(error.reason))
    )  # fmt: skip
    assert [e.written_version for e in got] == [1] * 5
    assert bad == ["unknown_version"] * 5


async def test_duplicates_collapse_only_when_asked(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=3)
    once = [nav_item(s, T0 + i) for i in range(5) for s in SYMBOLS]
    again = [nav_item(s, T0 + i) for i in (1, 3) for s in SYMBOLS]  # re-delivered, same ids
    await produce(kafka_settings.bootstrap_servers, topic, [*once, *again])

    reader = EventReader(kafka_settings, topic, dedupe=True, stop_at_end=True)
    got = await read_all(reader)
    assert sorted(e.id for e in got) == sorted(nav_event(s, T0 + i).id
                                               for i in range(5) for s in SYMBOLS)  # fmt: skip
    assert reader.duplicates == len(again)

    kept = await read_all(EventReader(kafka_settings, topic, stop_at_end=True))
    assert len(kept) == len(once) + len(again)
    assert len({e.id for e in kept}) == len(once)


async def test_bad_records_surface_and_the_stream_goes_on(
    kafka_settings: KafkaSettings, new_topic: NewTopic
) -> None:
    topic = await new_topic(partitions=1)
    good = nav_item(SYMBOLS[0], T0)
    doc = orjson.loads(good[0] or b"")
    violation = orjson.dumps({**doc, "data": {**doc["data"], "timestamp": "noon"}})
    unknown = orjson.dumps({**doc, "type": "some.new.type", "dataschema": "urn:x"})
    items: list[Item] = [
        (b"{not json", "k", []),
        (b'"just a string"', "k", []),
        good,
        (violation, SYMBOLS[0], good[2]),
        (unknown, SYMBOLS[0], []),
        (None, SYMBOLS[0], []),
        nav_item(SYMBOLS[0], T0 + 1),
    ]
    await produce(kafka_settings.bootstrap_servers, topic, items)

    seen: list[tuple[int, str]] = []

    async def on_error(record: KafkaRecord, error: BadRecord) -> None:
        seen.append((record.offset, error.reason))

    got = await read_all(EventReader(kafka_settings, topic, on_error=on_error,
                                     stop_at_end=True))  # fmt: skip
    assert [e.offset for e in got] == [2, 6]
    assert seen == [(0, "not_json"), (1, "not_cloudevent"), (3, "schema_violation"),
                    (4, "unknown_type"), (5, "empty_value")]  # fmt: skip

    # without a handler: raised, with where it was; iterating again goes on after it
    reasons: list[str] = []
    notes: list[str] = []
    offsets: list[int] = []
    async with (
        asyncio.timeout(WAIT_S),
        EventReader(kafka_settings, topic, stop_at_end=True) as reader,
    ):
        while True:
            try:
                async for event in reader:
                    offsets.append(event.offset)
                break
            except BadRecord as exc:
                reasons.append(exc.reason)
                notes.extend(getattr(exc, "__notes__", []))
    assert offsets == [2, 6]
    assert reasons == [reason for _, reason in seen]
    assert notes[0] == f"at {topic} partition 0 offset 0"
    assert reader.bad_records == 5


def test_a_naive_time_is_refused(kafka_settings: KafkaSettings) -> None:
    with pytest.raises(ConfigError, match="timezone"):
        EventReader(kafka_settings, "t", start=datetime(2024, 5, 1))
