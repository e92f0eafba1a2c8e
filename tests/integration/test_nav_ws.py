"""The NAV WebSocket source against the Vinter simulator over real sockets, onto real Kafka."""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
import pytest
from pydantic import SecretStr

from bridge import validation
from bridge.backoff import Backoff
from bridge.config import KafkaSettings, VinterSettings
from bridge.errors import AuthError, UpstreamError
from bridge.normalize.nav import mark_of
from bridge.publish import Publisher
from bridge.sources.nav_ws import NavSocketSource
from bridge.sources.vinter_rest import VinterRest
from bridge.sources.worker import Worker
from bridge.state import Checkpointer, MarkBook, recover
from bridge.supervisor import Progress, keep_running
from bridgedev.sim.vinter import DropMode, VinterSim
from tests.kafkautil import read_topic, schema_error, values, wait_for

pytestmark = pytest.mark.integration

DAILY, HOURLY, REAL_TIME = "vnfa-btca-15-d", "vnfa-btca-15-h", "vnfa-btca-15-r"
SYMBOLS = [REAL_TIME, HOURLY, DAILY]
TOKEN = "ws-token-SENTINEL-5f3a"
KEY = "rest-key-SENTINEL-9c1e"
FAST = {"initial": 0.05, "cap": 0.5}


def make_sim(symbols: Sequence[str] = SYMBOLS, **kwargs: Any) -> VinterSim:
    return VinterSim(symbols, token=TOKEN, api_key=KEY, seed=3, **kwargs)


def vinter(sim: VinterSim, token: str = TOKEN, **kwargs: Any) -> VinterSettings:
    return VinterSettings(
        ws_url=sim.ws_url, rest_url=sim.base_url, token=token, api_key=KEY, **kwargs
    )


def rest_client(sim: VinterSim) -> VinterRest:
    return VinterRest(sim.base_url, SecretStr(KEY), backoff=Backoff(initial=0.01, cap=0.05))


@asynccontextmanager
async def supervised(sources: Iterable[NavSocketSource]) -> AsyncIterator[list[asyncio.Task[None]]]:
    """Each source under `keep_running` with a fast backoff; cancelled and awaited at the end."""
    tasks = [
        asyncio.create_task(keep_running(s, backoff=Backoff(**FAST)), name=s.name) for s in sources
    ]
    try:
        yield tasks
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def ticks(kafka: KafkaSettings, count: int, *, idle: float = 0.5) -> list[dict[str, Any]]:
    records = await read_topic(
        kafka.bootstrap_servers, kafka.topics.nav_ticks, until=count, idle=idle, timeout=60
    )
    for record in records:
        assert record.key is not None
        assert orjson.loads(record.value or b"")["subject"] == record.key.decode()
    return values(records)


def by_symbol(docs: list[dict[str, Any]]) -> dict[str, list[int]]:
    """Timestamps per symbol, in topic order (one key, one partition, so in offset order)."""
    found: dict[str, list[int]] = defaultdict(list)
    for doc in docs:
        data = doc["data"]
        assert isinstance(data, dict)
        found[data["symbol"]].append(data["timestamp"])
    return found


def assert_exactly_once(docs: list[dict[str, Any]], sim: VinterSim, symbol: str) -> int:
    """The topic holds every history record of `symbol` in the covered interval once, in
    order; returns how many."""
    ids = [d["id"] for d in docs if d["subject"] == symbol]
    duplicated = [i for i, n in Counter(ids).items() if n > 1]
    assert not duplicated, f"{symbol}: duplicates {duplicated[:5]}"
    got = by_symbol(docs)[symbol]
    assert got == sorted(got), f"{symbol}: out of order"
    expected = [r["timestamp"] for r in sim.history(symbol) if got[0] <= r["timestamp"] <= got[-1]]
    missing = sorted(set(expected) - set(got))
    assert not missing, f"{symbol}: {len(missing)} missing, first {missing[:5]}"
    assert got == expected
    return len(got)


def last_timestamp(sim: VinterSim, symbol: str) -> int:
    return int(sim.history(symbol)[-1]["timestamp"])


async def ticks_through(
    kafka: KafkaSettings, sim: VinterSim, symbols: Iterable[str]
) -> list[dict[str, Any]]:
    """The NAV topic read until it holds the last record of every symbol (then 0.5 s more)."""
    waiting = {symbol: last_timestamp(sim, symbol) for symbol in symbols}
    scanned = 0

    def through(records: list[Any]) -> bool:
        nonlocal scanned
        for record in records[scanned:]:
            data = orjson.loads(record.value)["data"]
            if waiting.get(data["symbol"]) == data["timestamp"]:
                del waiting[data["symbol"]]
        scanned = len(records)
        return not waiting

    docs = values(
        await read_topic(
            kafka.bootstrap_servers, kafka.topics.nav_ticks, until=through, idle=0.5, timeout=60
        )
    )
    for doc in docs:
        assert doc["subject"] == doc["data"]["symbol"]
    return docs


async def caught_up(sim: VinterSim, book: MarkBook, symbols: Iterable[str]) -> None:
    """Stop the simulator's clock and wait until every symbol's mark reaches its last record."""
    sim.rate = 0  # the emitter runs on this loop: no tick is half done
    await wait_for(lambda: all(book.get(s) == last_timestamp(sim, s) for s in symbols), timeout=30)


# -- the happy path ------------------------------------------------------------------------


async def test_records_arrive_once_keyed_in_order_and_valid(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    n = 60
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim() as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        settings = vinter(sim)
        sources = [
            NavSocketSource(s, settings, publisher, book, rest, receiver=nav_receiver)
            for s in SYMBOLS
        ]
        async with supervised(sources):
            await sim.wait_sockets(len(SYMBOLS))
            for symbol in SYMBOLS:
                sim.append(symbol, n)
            await wait_for(lambda: sum(s.published for s in sources) == n * len(SYMBOLS))
        await publisher.flush(30)
        # no mark yet: one call each for where the symbol starts, no back-fill
        assert sim.rest_requests.total() == len(SYMBOLS)

    docs = await ticks(kafka_settings, n * len(SYMBOLS))
    assert len(docs) == n * len(SYMBOLS)
    stamps = by_symbol(docs)
    for symbol in SYMBOLS:
        emitted = sim.emitted(symbol)
        assert stamps[symbol] == [r["timestamp"] for r in emitted]
        assert [d["id"] for d in docs if d["subject"] == symbol] == [
            f"nav:{symbol}:{r['timestamp']}:1" for r in emitted
        ]
    for doc in docs:
        assert schema_error(doc) is None
        assert doc["source"] == "/vinter/nav/ws"
    by_id = {(r["symbol"], r["timestamp"]): r for s in SYMBOLS for r in sim.emitted(s)}
    for doc in docs[:10]:
        data = doc["data"]
        assert isinstance(data, dict)
        upstream = by_id[data["symbol"], data["timestamp"]]
        assert data["id"] == upstream["id"]
        assert data.get("close", data.get("value")) in (
            upstream.get("close"),
            upstream.get("value"),
        )
    assert all(s.duplicates == 0 and s.bad_records == 0 for s in sources)


# -- drops, reconnects and back-fill -------------------------------------------------------


async def test_a_new_symbol_starts_after_the_newest_record_rest_has(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    """Its mark is set before the socket opens (the service's shards commit it first), so a
    holder that dies before its first commit leaves the next one a mark to back-fill from;
    what REST already had is history, not published."""
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([REAL_TIME], history_days=1) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        start = last_timestamp(sim, REAL_TIME)
        source = NavSocketSource(
            REAL_TIME, vinter(sim), publisher, book, rest, receiver=nav_receiver
        )
        async with supervised([source]):
            await sim.wait_sockets(1)
            assert book.get(REAL_TIME) == start
            live = [int(r["timestamp"]) for r in sim.append(REAL_TIME, 20)]
            await wait_for(lambda: source.published == 20)
        await publisher.flush(30)
    docs = await ticks(kafka_settings, 20)
    assert by_symbol(docs)[REAL_TIME] == live
    assert min(live) > start


@pytest.mark.parametrize("mode", ["clean", "abrupt"])
async def test_drop_mid_stream_is_back_filled_exactly_once(
    kafka_settings: KafkaSettings,
    mode: DropMode,
    nav_receiver: Worker,
) -> None:
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim(rate=40) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        sources = [
            NavSocketSource(s, vinter(sim), publisher, book, rest, receiver=nav_receiver)
            for s in SYMBOLS
        ]
        async with supervised(sources):
            for drop in range(1, 4):
                await sim.wait_sockets(len(SYMBOLS))
                floor = sum(s.published for s in sources)

                def published_more(f: int = floor) -> bool:
                    return sum(s.published for s in sources) >= f + 30

                await wait_for(published_more)
                # drop while the simulator keeps producing: what it makes meanwhile is
                # only on REST
                assert await sim.drop_all(mode) == len(SYMBOLS)

                def reconnected(d: int = drop) -> bool:
                    return sim.ws_connects >= len(SYMBOLS) * (d + 1)

                await wait_for(reconnected)
            await sim.wait_sockets(len(SYMBOLS))
            await caught_up(sim, book, SYMBOLS)
        await publisher.flush(30)

    assert all(s.sessions >= 4 for s in sources)
    assert sum(s.backfilled for s in sources) > 0, "the drops left gaps to back-fill"
    docs = await ticks_through(kafka_settings, sim, SYMBOLS)
    published = sum(s.published for s in sources)
    assert sum(assert_exactly_once(docs, sim, symbol) for symbol in SYMBOLS) == published
    assert {d["source"] for d in docs} == {"/vinter/nav/ws", "/vinter/nav/rest"}


async def test_backfill_failure_holds_the_live_feed_until_rest_recovers(
    kafka_settings: KafkaSettings,
    nav_receiver: Worker,
) -> None:
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([REAL_TIME], rate=40) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        source = NavSocketSource(
            REAL_TIME, vinter(sim), publisher, book, rest, receiver=nav_receiver
        )
        async with supervised([source]):
            await wait_for(lambda: source.published >= 20)
            sim.rest_fail = [500] * 6  # the REST client gives up after 5 attempts
            await sim.drop_all("abrupt")
            await wait_for(lambda: source.sessions >= 3, timeout=15)
            await wait_for(lambda: not sim.rest_fail, timeout=15)  # every 500 was served
            await caught_up(sim, book, [REAL_TIME])
        await publisher.flush(30)

    assert source.backfilled > 0
    docs = await ticks_through(kafka_settings, sim, [REAL_TIME])
    assert assert_exactly_once(docs, sim, REAL_TIME) == source.published


async def test_restart_recovers_marks_from_kafka_without_duplicates_or_gaps(
    kafka_settings: KafkaSettings,
    nav_receiver: Worker,
) -> None:
    topic = kafka_settings.topics.nav_ticks
    async with make_sim(rate=40) as sim, rest_client(sim) as rest:
        settings = vinter(sim)

        book = MarkBook(topic)
        publisher = Publisher(kafka_settings)
        await publisher.start()
        checkpointer = Checkpointer(kafka_settings, publisher, [book], interval_s=0.2)
        sources = [
            NavSocketSource(s, settings, publisher, book, rest, receiver=nav_receiver)
            for s in SYMBOLS
        ]
        checkpoints = asyncio.create_task(checkpointer.run())
        async with supervised(sources):
            await wait_for(lambda: all(s.published >= 30 for s in sources))
            assert await checkpointer.checkpoint() == 1
            await wait_for(lambda: all(s.published >= 60 for s in sources))
            # The crash: sources, checkpoints and all stop mid-stream, no final checkpoint.
            checkpoints.cancel()
        await asyncio.gather(checkpoints, return_exceptions=True)
        await publisher.close()  # what the producer had taken is what Kafka gets
        await sim.wait_emitted(REAL_TIME, len(sim.emitted(REAL_TIME)) + 20)  # it goes on

        recovered = await recover(kafka_settings, topic, mark_of)
        for symbol in SYMBOLS:  # a source cancelled inside publish() may not have advanced
            mark, before = recovered.get(symbol), book.get(symbol)
            assert mark is not None
            assert before is not None
            assert mark >= before
        async with Publisher(kafka_settings) as publisher2:
            again = [
                NavSocketSource(s, settings, publisher2, recovered, rest, receiver=nav_receiver)
                for s in SYMBOLS
            ]
            async with supervised(again):
                await sim.wait_sockets(len(SYMBOLS))
                await caught_up(sim, recovered, SYMBOLS)
            await publisher2.flush(30)

    assert sum(s.backfilled for s in again) > 0
    docs = await ticks_through(kafka_settings, sim, SYMBOLS)
    for symbol in SYMBOLS:
        assert_exactly_once(docs, sim, symbol)


@pytest.mark.parametrize("batch", [None, 4], ids=["one-a-message", "arrays"])
async def test_a_stall_that_ends_on_the_same_socket_is_back_filled(
    kafka_settings: KafkaSettings,
    batch: int | None,
    nav_receiver: Worker,
) -> None:
    """Records produced while an open socket is silent never come through it: the live feed
    resumes further on, and the gap before its first record is filled from REST first."""
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([REAL_TIME], rate=40, ws_batch=batch) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        source = NavSocketSource(
            REAL_TIME, vinter(sim), publisher, book, rest, receiver=nav_receiver
        )
        async with supervised([source]):
            await wait_for(lambda: source.published >= 20)
            sim.stall = True  # shorter than the watchdog and the keepalive: the socket stays
            await sim.wait_emitted(REAL_TIME, len(sim.emitted(REAL_TIME)) + 20)
            sim.stall = False
            floor = source.published
            await wait_for(lambda: source.published >= floor + 40)
            await caught_up(sim, book, [REAL_TIME])
        await publisher.flush(30)

    assert source.sessions == 1, "one socket throughout"
    assert source.backfilled >= 20
    docs = await ticks_through(kafka_settings, sim, [REAL_TIME])
    assert assert_exactly_once(docs, sim, REAL_TIME) == source.published


async def test_accept_then_close_backs_off_although_each_session_back_fills(
    kafka_settings: KafkaSettings,
    nav_receiver: Worker,
) -> None:
    """A server that completes every handshake and closes at once while REST answers: each
    session back-fills a little, yet the delay grows (x1.6) instead of starting over."""
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([REAL_TIME], rate=40) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        source = NavSocketSource(
            REAL_TIME, vinter(sim), publisher, book, rest, receiver=nav_receiver
        )
        async with supervised([source]):  # backoff from 0.05 s
            await wait_for(lambda: source.published >= 20)
            sim.accept_then_close = True
            began = time.monotonic()
            await sim.drop_all("abrupt")
            await wait_for(lambda: sum(t > began for t, _ in sim.ws_attempt_times) >= 5, 15)
            attempts = [t for t, _ in sim.ws_attempt_times if t > began]
            backfilled = source.backfilled
            sim.accept_then_close = False
            await sim.wait_sockets(1)
            await caught_up(sim, book, [REAL_TIME])
        await publisher.flush(30)

    for i, (before, after) in enumerate(itertools.pairwise(attempts[:5]), start=1):
        assert after - before >= 0.8 * FAST["initial"] * 1.6**i, f"attempt {i + 1} too soon"
    assert backfilled > 0, "the short sessions did back-fill"
    docs = await ticks_through(kafka_settings, sim, [REAL_TIME])
    assert assert_exactly_once(docs, sim, REAL_TIME) == source.published


# -- bad input -----------------------------------------------------------------------------


async def test_malformed_and_invalid_messages_are_dead_lettered(
    kafka_settings: KafkaSettings,
    nav_receiver: Worker,
) -> None:
    n = 50
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([REAL_TIME, HOURLY]) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        sim.malformed_every = 7
        sim.invalid_every = 5
        sources = [
            NavSocketSource(s, vinter(sim), publisher, book, rest, receiver=nav_receiver)
            for s in sim.symbols
        ]
        async with supervised(sources):
            await sim.wait_sockets(2)
            for symbol in sim.symbols:
                sim.append(symbol, n)
            await wait_for(lambda: all(s.published == n for s in sources))
        await publisher.flush(30)

    bad = sum(s.bad_records for s in sources)
    assert bad >= 2 * (n // 7)
    docs = await ticks(kafka_settings, 2 * n)
    for symbol in sim.symbols:
        assert by_symbol(docs)[symbol] == [r["timestamp"] for r in sim.emitted(symbol)]
    dead = values(
        await read_topic(
            kafka_settings.bootstrap_servers, kafka_settings.topics.dlq, until=bad, idle=0.5
        )
    )
    assert len(dead) == bad
    reasons: Counter[str] = Counter()
    for letter in dead:
        assert validation.first_error("bridge.deadletter", 1, letter) is None
        data = letter["data"]
        assert isinstance(data, dict)
        assert data["key"] in sim.symbols
        assert data["event_type"] == "vinter.nav.tick"
        assert data["raw"]
        reasons[data["reason"]] += 1
        if data["reason"] == "bad_json":
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(data["raw"])
        else:
            assert isinstance(orjson.loads(data["raw"]), dict)
            assert data["detail"]
    assert reasons["bad_json"] >= 2 * (n // 7) - 2
    assert set(reasons) - {"bad_json"} <= {"bad_field", "missing_field"}
    assert reasons["bad_field"] > 0
    assert reasons["missing_field"] > 0


# -- credentials and secrets ---------------------------------------------------------------


async def test_wrong_token_is_one_clear_error_and_no_reconnect_storm(
    kafka_settings: KafkaSettings,
    caplog: pytest.LogCaptureFixture,
    nav_receiver: Worker,
) -> None:
    caplog.set_level(logging.INFO)
    wrong = "wrong-token-SENTINEL-77"
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([HOURLY]) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        source = NavSocketSource(
            HOURLY, vinter(sim, token=wrong), publisher, book, rest, receiver=nav_receiver
        )
        async with supervised([source]):
            await wait_for(lambda: sim.ws_handshake_rejects == 1)
            with pytest.raises(TimeoutError):  # the supervisor parks it for 300 s
                await wait_for(lambda: sim.ws_attempts > 1, timeout=3)
        assert sim.ws_attempts == 1

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and HOURLY in r.getMessage()]
    assert len(errors) == 1
    assert not [r for r in caplog.records if "reconnecting" in r.getMessage()]
    message = errors[0].getMessage()
    assert HOURLY in message
    assert "vinter.token" in message
    assert "401" in message
    assert "SENTINEL" not in caplog.text


@pytest.mark.parametrize(
    ("reject", "kind", "retry_after"),
    [
        (403, AuthError, None),
        ((429, {"Retry-After": "7"}), UpstreamError, 7.0),
        ((503, {"Retry-After": "2"}), UpstreamError, 2.0),
        (500, UpstreamError, None),
        (404, UpstreamError, None),
    ],
)
async def test_handshake_refusals_are_translated(
    kafka_settings: KafkaSettings,
    reject: Any,
    kind: type[UpstreamError],
    retry_after: float | None,
    nav_receiver: Worker,
) -> None:
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with make_sim([DAILY]) as sim, rest_client(sim) as rest:
        sim.ws_reject = [reject]
        publisher = Publisher(kafka_settings)  # never started: nothing is published
        source = NavSocketSource(DAILY, vinter(sim), publisher, book, rest, receiver=nav_receiver)
        progress = Progress()
        with pytest.raises(UpstreamError) as info:
            await source.session(progress)
    error = info.value
    assert type(error) is kind
    assert DAILY in str(error)
    assert error.retry_after == retry_after
    if kind is AuthError:
        assert "vinter.token" in str(error)
    assert not progress.connected
    text = "".join(traceback.format_exception(error))
    assert "SENTINEL" not in text
    assert error.__cause__ is None
    assert error.__context__ is None


async def test_a_refused_rest_key_parks_the_socket_without_skipping_the_gap(
    kafka_settings: KafkaSettings,
    nav_receiver: Worker,
) -> None:
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with make_sim([REAL_TIME]) as sim:
        sim.append(REAL_TIME, 10)
        book.advance(REAL_TIME, sim.history(REAL_TIME)[4]["timestamp"])  # an earlier run
        wrong = VinterRest(sim.base_url, SecretStr("wrong-key"), backoff=Backoff(initial=0.01))
        async with wrong:
            publisher = Publisher(kafka_settings)  # never started: nothing may be published
            source = NavSocketSource(
                REAL_TIME, vinter(sim), publisher, book, wrong, receiver=nav_receiver
            )
            progress = Progress()
            with pytest.raises(AuthError, match=r"vinter\.api_key"):
                await source.session(progress)
    assert progress.connected
    assert book.get(REAL_TIME) == sim.history(REAL_TIME)[4]["timestamp"]
    assert source.published == 0


async def test_the_token_never_reaches_logs_or_errors(
    kafka_settings: KafkaSettings,
    caplog: pytest.LogCaptureFixture,
    nav_receiver: Worker,
) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="websockets")
    book = MarkBook(kafka_settings.topics.nav_ticks)
    errors: list[BaseException] = []
    async with (
        make_sim([REAL_TIME], rate=20) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        source = NavSocketSource(
            REAL_TIME, vinter(sim), publisher, book, rest, receiver=nav_receiver
        )
        async with supervised([source]):
            await wait_for(lambda: source.published >= 5)
            await sim.drop_all("abrupt")  # a drop, a reconnect and a back-fill
            await wait_for(lambda: sim.ws_connects >= 2 and source.backfilled > 0)
            sim.ws_reject = [(503, {"Retry-After": "0"})]
            await sim.drop_all("clean")  # a refused handshake, then a reconnect
            await wait_for(lambda: sim.ws_connects >= 3)
            sim.ws_reject = [401]
            await sim.drop_all("clean")  # refused token: parked
            await wait_for(lambda: sim.ws_handshake_rejects >= 2)
            await wait_for(lambda: any("vinter.token" in r.getMessage() for r in caplog.records))

        # Errors raised to the caller: a refused handshake and a URL websockets rejects.
        # (the configuration refuses such a URL: model_copy does not validate)
        rejected = vinter(sim).model_copy(update={"ws_url": "http://127.0.0.1:9"})
        for settings in (vinter(sim), rejected):
            sim.ws_reject = [401]
            failing = NavSocketSource(
                REAL_TIME, settings, publisher, book, rest, receiver=nav_receiver
            )
            try:
                await failing.session(Progress())
            except UpstreamError as exc:
                errors.append(exc)
        assert len(errors) == 2

    assert "token=***" in caplog.text, "websockets logged its request line, redacted"
    for record in caplog.records:
        assert "SENTINEL" not in record.getMessage()
        assert "SENTINEL" not in repr(record.args)
    assert "SENTINEL" not in caplog.text
    for error in errors:
        assert "SENTINEL" not in "".join(traceback.format_exception(error))
        assert "SENTINEL" not in repr(error)
        assert error.__context__ is None
    assert "SENTINEL" not in repr(source)


# -- the stale-feed watchdog ---------------------------------------------------------------


async def test_a_silent_socket_is_stale(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([REAL_TIME]) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        settings = vinter(sim, stale_after_s=0.5)
        source = NavSocketSource(REAL_TIME, settings, publisher, book, rest, receiver=nav_receiver)
        sim.stall = True  # the socket stays open and the TCP connection alive; nothing comes
        progress = Progress()
        async with asyncio.timeout(3):
            with pytest.raises(UpstreamError, match=r"stale: no message for 0\.5s"):
                await source.session(progress)
        sim.stall = False
    assert progress.connected


async def test_waiting_on_a_quiet_feed_is_not_stale_until_the_limit(
    kafka_settings: KafkaSettings,
    nav_receiver: Worker,
) -> None:
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim([REAL_TIME]) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        settings = vinter(sim, stale_after_s=1.0)
        source = NavSocketSource(REAL_TIME, settings, publisher, book, rest, receiver=nav_receiver)
        task = asyncio.create_task(source.session(Progress()))
        await sim.wait_sockets(1)
        for _ in range(4):  # a record every 0.25 s keeps a 1 s watchdog quiet
            sim.append(REAL_TIME)
            await asyncio.sleep(0.25)  # the pace of the feed, not a wait for a result
        assert not task.done()
        with pytest.raises(UpstreamError, match="stale"):
            await asyncio.wait_for(task, timeout=3)
    assert source.published == 4


# -- many sockets --------------------------------------------------------------------------


async def test_a_thousand_sockets_in_one_process(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    symbols = [f"vnfa-s{i:04d}-r" for i in range(1000)]
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        make_sim(symbols, rate=0.5) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        settings = vinter(sim)
        sources = [
            NavSocketSource(s, settings, publisher, book, rest, receiver=nav_receiver)
            for s in symbols
        ]
        async with supervised(sources):
            # each new symbol asks REST where it starts before its socket opens: 1,000 calls
            await sim.wait_sockets(len(symbols), timeout=90)
            # the start marks fill the book before anything is published: wait for records
            await wait_for(lambda: all(s.published for s in sources), timeout=30)
        await publisher.flush(30)
        published = sum(s.published for s in sources)

    docs = await ticks(kafka_settings, published, idle=1.0)
    assert len(docs) == published
    assert set(by_symbol(docs)) == set(symbols)
