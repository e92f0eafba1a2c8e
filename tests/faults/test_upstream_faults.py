"""Upstream faults: every WebSocket and gRPC failure ends in back-fill or in a gap event.

Real simulators on 127.0.0.1, the fault suite's 3-node Kafka cluster (RF 3, min ISR 2), and
the supervisor's production backoff (1 s, x1.6, +/-20 %) unless a test says otherwise.

* NAV: after each WebSocket fault (close 1006 and 1011, handshake 500 / 503 / 429 with and
  without Retry-After, a silent stall, accept-then-close) Kafka holds, per symbol, exactly
  what the simulator emitted: every record once, in order, the outage's part from REST.
* VWAP: after each gRPC fault (UNAVAILABLE mid-stream, connections closed, a silent stall)
  the source re-subscribes and publishes exactly one `bridge.gap` per instrument per outage,
  in place, and no VWAP id twice.
* Timing: the p95 of drop -> next connection over 20 single drops is at most 2 s; a server
  that accepts and closes at once sees at most 20 attempts a minute.
* Secrets: the bridge as a process at DEBUG through all of the above; the sentinel token
  and keys appear in none of its output, the topics (values, keys, headers) or /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import grpc
import orjson
import pytest
import yaml
from pydantic import SecretStr

from bridge import validation
from bridge.backoff import Backoff
from bridge.config import KafkaSettings, KaikoSettings, VinterSettings, VwapSubscription
from bridge.normalize.vwap import instrument_key, mark_key, parse_rfc3339_ns
from bridge.publish import Publisher
from bridge.sources.nav_ws import NavSocketSource
from bridge.sources.vinter_rest import VinterRest
from bridge.sources.vwap_grpc import VwapSource
from bridge.sources.worker import Worker
from bridge.state import MarkBook
from bridge.supervisor import SourceState, keep_running
from bridgedev.sim.kaiko import KaikoSim, SentRecord
from bridgedev.sim.vinter import VinterSim, WsReject
from tests import bridgeproc
from tests.kafkautil import Records, read_topic, schema_error, values, wait_for

REAL_TIME, HOURLY = "vnfa-btca-15-r", "vnfa-etha-10-h"
NAV_SYMBOLS = (REAL_TIME, HOURLY)
NAV_RATE = 20.0  # records per second per symbol
STALE_S = 2.0  # the NAV watchdog in these tests (the production default is 60 s)
TOKEN, API_KEY, KAIKO_KEY = bridgeproc.TOKEN, bridgeproc.API_KEY, bridgeproc.KAIKO_KEY
SENTINEL = "SENTINEL"  # in each of the three
INSTRUMENTS = (
    ("cbse", "spot", "btc-usd"),
    ("binc", "spot", "btc-usdt"),
    ("binc", "spot", "eth-usdt"),
)
WILDCARD = VwapSubscription(exchange="*", instrument_class="spot", code="*", aggregate="1s")
VWAP_RATE = 60.0  # messages per second on a stream, round robin over the instruments
DROPS = 20  # single drops measured per upstream
P95_LIMIT_S = 2.0
WINDOW_S = 30.0  # the accept-then-close measuring window
ATTEMPTS_PER_MINUTE = 20


# -- helpers -------------------------------------------------------------------------------


def p95(samples: Sequence[float]) -> float:
    """The 95th percentile, nearest rank (of 20 samples: the 19th smallest)."""
    ranked = sorted(samples)
    return ranked[max(0, -(-95 * len(ranked) // 100) - 1)]


def figures(samples: Sequence[float]) -> str:
    return (
        f"n={len(samples)} p50={statistics.median(samples):.3f}s p95={p95(samples):.3f}s "
        f"max={max(samples):.3f}s"
    )


async def until(
    predicate: Callable[[], bool], what: Callable[[], object], timeout: float, step: float = 0.02
) -> None:
    """`wait_for`, failing with `what()` (the state that matters) in the message."""
    try:
        await wait_for(predicate, timeout=timeout, step=step)
    except TimeoutError:
        raise AssertionError(f"not within {timeout:g}s: {what()}") from None


@contextlib.asynccontextmanager
async def supervised(sources: Iterable[Any]) -> AsyncIterator[list[SourceState]]:
    """Each source under `keep_running` with the production backoff, as a task; cancelled
    and awaited on the way out."""
    pairs = [(s, SourceState(s.name)) for s in sources]
    tasks = [
        asyncio.create_task(keep_running(s, state=st, backoff=Backoff()), name=s.name)
        for s, st in pairs
    ]
    try:
        yield [st for _, st in pairs]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for task in tasks:  # a source that died of a bug is a failure, not a quiet test
            if not task.cancelled() and task.exception() is not None:
                raise AssertionError(f"{task.get_name()} crashed") from task.exception()


# -- NAV -----------------------------------------------------------------------------------


def make_vinter(symbols: Sequence[str] = NAV_SYMBOLS) -> VinterSim:
    return VinterSim(symbols, token=TOKEN, api_key=API_KEY, seed=5)


def vinter_settings(sim: VinterSim) -> VinterSettings:
    return VinterSettings(
        ws_url=sim.ws_url,
        rest_url=sim.base_url,
        token=TOKEN,
        api_key=API_KEY,
        stale_after_s=STALE_S,
    )


def rest_client(sim: VinterSim) -> VinterRest:
    return VinterRest(sim.base_url, SecretStr(API_KEY), backoff=Backoff(initial=0.05, cap=0.2))


def last_emitted(sim: VinterSim, symbol: str) -> int:
    return int(sim.emitted(symbol)[-1]["timestamp"])


async def caught_up(sim: VinterSim, book: MarkBook, symbols: Iterable[str]) -> None:
    """Stop the simulator's clock; wait until every symbol's mark is its last record."""
    sim.rate = 0  # the emitter runs on this loop: no append is half done
    await wait_for(lambda: all(book.get(s) == last_emitted(sim, s) for s in symbols), timeout=30)


async def nav_docs(
    kafka: KafkaSettings, sim: VinterSim, symbols: Iterable[str]
) -> dict[str, list[dict[str, Any]]]:
    """The NAV topic, per symbol in offset order, read until it holds each symbol's last
    emitted record (then 0.5 s more, to see anything extra)."""
    waiting = {symbol: last_emitted(sim, symbol) for symbol in symbols}
    scanned = 0

    def through(records: Records) -> bool:
        nonlocal scanned
        for record in records[scanned:]:
            data = orjson.loads(record.value or b"")["data"]
            if waiting.get(data["symbol"]) == data["timestamp"]:
                del waiting[data["symbol"]]
        scanned = len(records)
        return not waiting

    records = await read_topic(
        kafka.bootstrap_servers, kafka.topics.nav_ticks, until=through, idle=0.5, timeout=60
    )
    found: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in records:
        doc = orjson.loads(record.value or b"")
        assert record.key is not None
        assert record.key.decode() == doc["subject"] == doc["data"]["symbol"]
        found[doc["subject"]].append(doc)
    return found


def assert_emitted_once_in_order(docs: list[dict[str, Any]], sim: VinterSim, symbol: str) -> int:
    """Kafka holds every record the simulator emitted for `symbol`, once, in order, each a
    valid event; returns how many came from REST."""
    ids = [d["id"] for d in docs]
    duplicated = [i for i, n in Counter(ids).items() if n > 1]
    assert not duplicated, f"{symbol}: duplicates {duplicated[:5]}"
    got = [d["data"]["timestamp"] for d in docs]
    expected = [r["timestamp"] for r in sim.emitted(symbol)]
    missing = sorted(set(expected) - set(got))
    assert not missing, f"{symbol}: {len(missing)} of {len(expected)} missing, first {missing[:5]}"
    assert got == expected, f"{symbol}: out of order or extra records"
    for doc in docs:
        assert schema_error(doc) is None
    return sum(1 for d in docs if d["source"] == "/vinter/nav/rest")


@dataclass(frozen=True)
class WsFault:
    """A WebSocket fault: how the live sockets end, what their reconnects meet, and the
    error the supervisor must have seen last."""

    error: str
    drop: Literal["abrupt", "clean", "stall"] = "abrupt"  # abrupt: no close frame (1006)
    code: int | None = None  # the close code of a clean drop
    reject: tuple[WsReject, ...] = ()  # one handshake answer per socket, after the drop
    wait_s: float = 0.8  # the least delay a refused reconnect must respect (backoff's floor)


WS_FAULTS = [
    pytest.param(WsFault("connection lost (no close frame)"), id="close-1006"),
    pytest.param(WsFault("connection lost (code 1011)", "clean", 1011), id="close-1011"),
    pytest.param(WsFault("HTTP 500", reject=(500, 500)), id="handshake-500"),
    pytest.param(WsFault("HTTP 503", reject=(503, 503)), id="handshake-503"),
    pytest.param(
        WsFault("HTTP 503 (Retry-After 2s)", reject=((503, {"Retry-After": "2"}),) * 2, wait_s=2),
        id="handshake-503-retry-after",
    ),
    pytest.param(WsFault("HTTP 429", reject=(429, 429)), id="handshake-429"),
    pytest.param(
        WsFault("HTTP 429 (Retry-After 3s)", reject=((429, {"Retry-After": "3"}),) * 2, wait_s=3),
        id="handshake-429-retry-after",
    ),
    pytest.param(WsFault("stale: no message for 2s", "stall"), id="silent-stall"),
]


@pytest.mark.parametrize("fault", WS_FAULTS)
async def test_websocket_fault_ends_in_backfill(
    cluster_settings: KafkaSettings,
    fault: WsFault,
    nav_receiver: Worker,
) -> None:
    book = MarkBook(cluster_settings.topics.nav_ticks)
    async with (
        make_vinter() as sim,
        rest_client(sim) as rest,
        Publisher(cluster_settings) as publisher,
    ):
        settings = vinter_settings(sim)
        sources = [
            NavSocketSource(s, settings, publisher, book, rest, receiver=nav_receiver)
            for s in NAV_SYMBOLS
        ]
        async with supervised(sources) as states:
            await sim.wait_sockets(len(sources), timeout=20)
            sim.rate = NAV_RATE  # from now on everything emitted must reach Kafka
            await wait_for(lambda: all(s.published >= 10 for s in sources), timeout=20)
            sessions = [s.sessions for s in sources]
            began = time.monotonic()
            if fault.drop == "stall":
                sim.stall = True  # open sockets go silent; new ones open, then stay silent
                await wait_for(
                    lambda: (
                        all(s.sessions >= n + 1 for s, n in zip(sources, sessions, strict=True))
                        and sim.open_sockets() == len(sources)
                    ),
                    timeout=20,
                )
                # records emitted now reach no socket: only REST has them
                await sim.wait_emitted(HOURLY, len(sim.emitted(HOURLY)) + int(NAV_RATE))
                sim.stall = False
            else:
                sim.ws_reject = list(fault.reject)
                assert await sim.drop_all(fault.drop, fault.code) == len(sources)
                await wait_for(
                    lambda: (
                        all(s.sessions >= n + 1 for s, n in zip(sources, sessions, strict=True))
                        and sim.open_sockets() == len(sources)
                        and not sim.ws_reject
                    ),
                    timeout=30,
                )
            # back to normal: the new sockets deliver live records again
            floor = [s.published for s in sources]
            await wait_for(
                lambda: all(s.published >= f + 10 for s, f in zip(sources, floor, strict=True)),
                timeout=20,
            )
            await caught_up(sim, book, NAV_SYMBOLS)
            errors = [st.last_error for st in states]
        await publisher.flush(30)

    docs = await nav_docs(cluster_settings, sim, NAV_SYMBOLS)
    backfilled = {s: assert_emitted_once_in_order(docs[s], sim, s) for s in NAV_SYMBOLS}
    print(f"\nNAV back-filled after the fault: {backfilled}; last errors: {errors}")
    for symbol in NAV_SYMBOLS:
        assert backfilled[symbol] > 0, f"{symbol}: nothing came from REST"
    assert sum(s.backfilled for s in sources) == sum(backfilled.values())
    if fault.reject:
        assert sim.ws_handshake_rejects == len(fault.reject)
        for symbol in NAV_SYMBOLS:  # each symbol's first reconnect was refused, then waited
            attempts = [t for t, s in sim.ws_attempt_times if s == symbol and t > began]
            assert len(attempts) >= 2
            waited = attempts[1] - attempts[0]
            assert waited >= fault.wait_s - 0.05, f"{symbol}: retried after {waited:.2f}s"
    for error in errors:
        assert fault.error in error
        assert SENTINEL not in error


# -- VWAP ----------------------------------------------------------------------------------


def key_of(rec: SentRecord) -> str:
    return instrument_key(rec.exchange, rec.instrument_class, rec.code)


def tick_id(rec: SentRecord) -> str:
    return f"vwap:{key_of(rec)}:{rec.aggregate}:{rec.uid}"


def make_kaiko(**kwargs: Any) -> KaikoSim:
    return KaikoSim(
        api_key=KAIKO_KEY,
        instruments=INSTRUMENTS,
        aggregates=("1s",),
        rate=VWAP_RATE,
        seed=7,
        **kwargs,
    )


def kaiko_settings(sim: KaikoSim, tmp_path: Path) -> KaikoSettings:
    ca_file = tmp_path / "kaiko-ca.pem"
    sim.write_ca(ca_file)
    # 0.5 s asks for the floor: two intervals of the 1s aggregate, 2 s
    return KaikoSettings(target=sim.target, api_key=KAIKO_KEY, ca_file=ca_file, stale_after_s=0.5)


def vwap_state(sim: KaikoSim, source: VwapSource, publisher: Publisher) -> str:
    return (
        f"streams={len(sim.streams)} open={sim.active_streams} sent={sim.messages_sent} "
        f"sessions={source.sessions} gaps={source.gaps} duplicates={source.duplicates} "
        f"acknowledged={publisher.published} pending={publisher.pending}"
    )


async def vwap_drained(
    sim: KaikoSim, source: VwapSource, publisher: Publisher, book: MarkBook
) -> list[SentRecord]:
    """Stop the simulator sending; wait until the source has published everything the open
    stream delivered and Kafka acknowledged it all. Returns everything the simulator sent
    (what it wrote into a connection that was then cut may never have arrived)."""
    sim.stall()
    last = {mark_key(key_of(r), r.aggregate): parse_rfc3339_ns(r.uid) for r in sim.streams[-1].sent}
    await until(
        lambda: all((book.get(k) or 0) >= v for k, v in last.items()) and publisher.pending == 0,
        lambda: vwap_state(sim, source, publisher),
        timeout=60,
    )
    return sim.sent


async def vwap_docs(kafka: KafkaSettings, count: int) -> list[dict[str, Any]]:
    records = await read_topic(
        kafka.bootstrap_servers, kafka.topics.vwap_ticks, until=count, idle=0.5, timeout=60
    )
    return values(records)


def assert_one_gap_per_instrument_per_outage(
    docs: list[dict[str, Any]], sent: list[SentRecord], outages: int
) -> int:
    """No id twice; ticks are what the simulator sent; each instrument has exactly
    `outages` gaps, each between the ticks it names, and anything sent but not in Kafka lies
    inside a gap. Returns the number of gap events."""
    ids = [d["id"] for d in docs]
    duplicated = [i for i, n in Counter(ids).items() if n > 1]
    assert not duplicated, f"duplicate ids: {duplicated[:5]}"
    ticks = [d for d in docs if d["type"] == "kaiko.vwap.tick"]
    assert {d["id"] for d in ticks} <= {tick_id(r) for r in sent}, "a tick nobody sent"
    gaps = 0
    for instrument in INSTRUMENTS:
        key = instrument_key(*instrument)
        order = [d for d in docs if d["subject"] == key]  # one key: one partition, in order
        uids = [d["data"]["uid"] for d in order if d["type"] == "kaiko.vwap.tick"]
        assert uids == sorted(uids), f"{key}: out of order"
        at = [i for i, d in enumerate(order) if d["type"] == "bridge.gap"]
        assert len(at) == outages, f"{key}: {len(at)} gap events for {outages} outages"
        spans = []
        for i in at:
            gap = order[i]
            assert validation.first_error("bridge.gap", 1, gap) is None
            assert gap["data"]["reason"] == "reconnect"
            assert gap["data"]["aggregate"] == "1s"
            assert 0 < i < len(order) - 1, f"{key}: a gap at the edge of the stream"
            before, after = order[i - 1], order[i + 1]
            assert before["type"] == after["type"] == "kaiko.vwap.tick"
            assert gap["data"]["last_before"] == before["data"]["uid"]
            assert gap["data"]["first_after"] == after["data"]["uid"]
            spans.append((before["data"]["uid"], after["data"]["uid"]))
        lost = sorted({r.uid for r in sent if key_of(r) == key} - set(uids))
        for uid in lost:
            assert any(lo < uid < hi for lo, hi in spans), f"{key}: {uid} lost, and no gap says so"
        gaps += len(at)
    return gaps


async def grpc_stall(sim: KaikoSim) -> None:
    """A silent stall: the watchdog cancels the stream, the source re-subscribes (into the
    stall), and then the gateway speaks again."""
    streams = len(sim.streams)
    sim.stall()
    await wait_for(lambda: len(sim.streams) > streams and sim.active_streams == 1, timeout=30)
    sim.unstall()


async def grpc_unavailable(sim: KaikoSim) -> None:
    sim.abort_next(grpc.StatusCode.UNAVAILABLE, details="simulated: gateway restarting")


async def grpc_closed(sim: KaikoSim) -> None:
    await sim.close_connections(down_for=0.3)


GRPC_FAULTS: dict[str, Callable[[KaikoSim], Awaitable[None]]] = {
    "unavailable": grpc_unavailable,
    "connection-closed": grpc_closed,
    "silent-stall": grpc_stall,
}
OUTAGES = 2


@pytest.mark.parametrize("fault", list(GRPC_FAULTS))
async def test_grpc_fault_ends_in_one_gap_per_instrument(
    cluster_settings: KafkaSettings, tmp_path: Path, fault: str
) -> None:
    inject = GRPC_FAULTS[fault]
    book = MarkBook(cluster_settings.topics.vwap_ticks)
    # the gateway repeats recent intervals on a new stream: the source must drop them
    async with make_kaiko(resend_on_reconnect=2) as sim, Publisher(cluster_settings) as publisher:
        source = VwapSource(WILDCARD, kaiko_settings(sim, tmp_path), publisher, book)

        def state() -> str:
            return vwap_state(sim, source, publisher)

        async with supervised([source]) as (supervisor,):
            await until(lambda: len(book) == len(INSTRUMENTS), state, timeout=30)
            for outage in range(1, OUTAGES + 1):
                streams, expected = len(sim.streams), outage * len(INSTRUMENTS)
                await inject(sim)

                # re-subscribed; the new session published again for every instrument (each
                # time after a gap event), and the stream went on
                def resubscribed(n: int = streams, g: int = expected) -> bool:
                    return (
                        len(sim.streams) > n
                        and source.gaps >= g
                        and len(sim.streams[-1].sent) >= 30
                    )

                await until(resubscribed, state, timeout=30)
                assert source.gaps == expected, state()
            last_error = supervisor.last_error
            sent = await vwap_drained(sim, source, publisher, book)

    docs = await vwap_docs(cluster_settings, publisher.published)
    gaps = assert_one_gap_per_instrument_per_outage(docs, sent, OUTAGES)
    print(
        f"\nVWAP {fault}: {OUTAGES} outages, {len(sim.streams)} streams, {gaps} gap events, "
        f"{source.duplicates} resent intervals dropped; last error: {last_error!r}"
    )
    assert gaps == source.gaps == OUTAGES * len(INSTRUMENTS)
    assert source.duplicates > 0, "the gateway's resends were recognised"
    assert source.sessions >= OUTAGES + 1
    assert KAIKO_KEY not in last_error
    if fault == "silent-stall":
        assert "stream stalled" in last_error
    else:
        assert "UNAVAILABLE" in last_error


# -- reconnect timing ----------------------------------------------------------------------


async def websocket_drops(publisher: Publisher, book: MarkBook, nav_receiver: Worker) -> None:
    """20 single drops (1006 and 1011 in turn) of a healthy socket: drop -> connected."""
    symbol = "vnfa-drops-r"
    connect: list[float] = []
    first: list[float] = []
    async with make_vinter([symbol]) as sim, rest_client(sim) as rest:
        source = NavSocketSource(
            symbol, vinter_settings(sim), publisher, book, rest, receiver=nav_receiver
        )

        def state() -> str:
            return (
                f"sessions={source.sessions} published={source.published} mark={book.get(symbol)}"
            )

        async with supervised([source]):
            await sim.wait_sockets(1, timeout=20)
            sim.rate = NAV_RATE
            for drop in range(DROPS):
                # healthy: the socket delivered records emitted after it opened
                emitted = len(sim.emitted(symbol))
                await sim.wait_emitted(symbol, emitted + 5)
                target = sim.emitted(symbol)[emitted + 4]["timestamp"]

                def marked(t: int = target) -> bool:
                    return (book.get(symbol) or 0) >= t

                await until(marked, state, timeout=20)
                began = time.monotonic()
                await sim.drop_all("abrupt" if drop % 2 == 0 else "clean", 1011)
                await sim.wait_sockets(1, timeout=20)
                connect.append(time.monotonic() - began)
                published = source.published

                def published_again(p: int = published) -> bool:
                    return source.published > p

                await until(published_again, state, 20, step=0.005)
                first.append(time.monotonic() - began)
            await caught_up(sim, book, [symbol])
    print(f"\nWebSocket drop -> connected: {figures(connect)}")
    print(f"WebSocket drop -> next record published: {figures(first)}")
    assert source.sessions == DROPS + 1
    assert source.backfilled > 0
    assert p95(connect) <= P95_LIMIT_S, figures(connect)


async def grpc_drops(publisher: Publisher, book: MarkBook, tmp_path: Path) -> None:
    """20 single drops (UNAVAILABLE and closed connections in turn) of a healthy stream:
    drop -> subscribed again."""
    connect: list[float] = []
    first: list[float] = []
    async with make_kaiko() as sim:
        source = VwapSource(WILDCARD, kaiko_settings(sim, tmp_path), publisher, book)

        def state() -> str:
            return vwap_state(sim, source, publisher)

        async with supervised([source]):
            await until(lambda: len(book) == len(INSTRUMENTS), state, timeout=30)
            for drop in range(DROPS):
                streams, gaps = len(sim.streams), source.gaps
                began = time.monotonic()
                if drop % 2 == 0:
                    sim.abort_next(grpc.StatusCode.UNAVAILABLE)
                else:
                    await sim.close_connections()

                def subscribed(n: int = streams) -> bool:
                    return len(sim.streams) > n

                def gap_reported(g: int = gaps) -> bool:
                    return source.gaps > g

                def healthy(g: int = gaps) -> bool:
                    return source.gaps == g + len(INSTRUMENTS) and len(sim.streams[-1].sent) >= 20

                await until(subscribed, state, 20, step=0.005)
                connect.append(time.monotonic() - began)
                # a new session publishes each instrument's first interval after a gap event
                await until(gap_reported, state, 20, step=0.005)
                first.append(time.monotonic() - began)
                # healthy: every instrument again, and the stream goes on
                await until(healthy, state, timeout=20)
    print(f"\ngRPC drop -> subscribed: {figures(connect)}")
    print(f"gRPC drop -> first record published: {figures(first)}")
    assert source.gaps == DROPS * len(INSTRUMENTS)
    assert p95(connect) <= P95_LIMIT_S, figures(connect)


async def accept_then_close(
    publisher: Publisher, book: MarkBook, kafka: KafkaSettings, nav_receiver: Worker
) -> None:
    """A server that completes every handshake and closes at once, while REST still
    answers (so each session back-fills a little), for a 30 s window: at most 20 attempts a
    minute. Once it behaves, the outage is back-filled."""
    symbol = "vnfa-atc-r"
    async with make_vinter([symbol]) as sim, rest_client(sim) as rest:
        source = NavSocketSource(
            symbol, vinter_settings(sim), publisher, book, rest, receiver=nav_receiver
        )
        async with supervised([source]) as (supervisor,):
            await sim.wait_sockets(1, timeout=20)
            sim.rate = NAV_RATE
            await wait_for(lambda: source.published >= 10, timeout=20)
            sim.accept_then_close = True
            began = time.monotonic()
            await sim.drop_all("abrupt")
            await wait_for(lambda: sim.ws_attempt_times[-1][0] > began, timeout=10)
            start = sim.ws_attempt_times[-1][0]
            await asyncio.sleep(start + WINDOW_S - time.monotonic())  # the measuring window
            attempts = [t for t, _ in sim.ws_attempt_times if start <= t <= start + WINDOW_S]
            sim.accept_then_close = False
            sessions = source.sessions
            await sim.wait_sockets(1, timeout=60)
            floor = source.published
            await wait_for(lambda: source.published >= floor + 10, timeout=20)
            await caught_up(sim, book, [symbol])
            last_error = supervisor.last_error

    per_minute = len(attempts) * 60 / WINDOW_S
    intervals = [b - a for a, b in itertools.pairwise(attempts)]
    print(
        f"\naccept-then-close: {len(attempts)} handshakes in {WINDOW_S:g}s = "
        f"{per_minute:.1f}/min; intervals {[round(i, 2) for i in intervals]}s; "
        f"{source.backfilled} records back-filled"
    )
    assert 3 <= len(attempts) <= ATTEMPTS_PER_MINUTE * WINDOW_S / 60
    for i, interval in enumerate(intervals, start=1):  # x1.6 each time, jitter 20 %
        assert interval >= 0.8 * 1.6**i, f"attempt {i + 1} came {interval:.2f}s after the last"
    assert sessions > len(attempts)
    assert "closed the connection" in last_error
    docs = await nav_docs(kafka, sim, [symbol])
    assert assert_emitted_once_in_order(docs[symbol], sim, symbol) > 0


async def test_reconnect_timing(
    cluster_settings: KafkaSettings, tmp_path: Path, nav_receiver: Worker
) -> None:
    """Three upstreams at once on one loop, as in the service: single drops of a healthy
    socket and of a healthy stream come back within 2 s (p95); a server that accepts and
    closes at once sees at most 20 attempts a minute."""
    topics = cluster_settings.topics
    nav, vwap = MarkBook(topics.nav_ticks), MarkBook(topics.vwap_ticks)
    async with Publisher(cluster_settings) as publisher, asyncio.TaskGroup() as group:
        group.create_task(websocket_drops(publisher, nav, nav_receiver))
        group.create_task(grpc_drops(publisher, vwap, tmp_path))
        group.create_task(accept_then_close(publisher, nav, cluster_settings, nav_receiver))


# -- secrets -------------------------------------------------------------------------------


def bridge_config(
    tmp_path: Path, kafka: KafkaSettings, vinter: VinterSim, kaiko: KaikoSim, ops: int
) -> Path:
    path = bridgeproc.write_config(
        tmp_path, kafka, vinter, kaiko, ops, nav=list(NAV_SYMBOLS), daily=[]
    )
    config = yaml.safe_load(path.read_text())
    config["kafka"]["replication_factor"] = kafka.replication_factor
    config["kafka"]["min_insync_replicas"] = kafka.min_insync_replicas
    config["vinter"]["stale_after_s"] = STALE_S
    config["kaiko"]["stale_after_s"] = 0.5
    config["kaiko"]["subscriptions"][0]["code"] = "*"  # every instrument, one stream
    config["log_format"] = "text"
    path.write_text(yaml.safe_dump(config))
    return path


async def websocket_faults(vinter: VinterSim) -> None:
    """Every WebSocket fault in turn, each until both sockets are back."""

    async def outage(inject: Callable[[], Awaitable[object]]) -> None:
        connects = vinter.ws_connects
        await inject()
        await until(
            lambda: (
                vinter.ws_connects >= connects + len(NAV_SYMBOLS)
                and vinter.open_sockets() == len(NAV_SYMBOLS)
                and not vinter.ws_reject
            ),
            lambda: f"connects={vinter.ws_connects} open={vinter.open_sockets()}",
            timeout=60,
        )
        # live records on the new sockets before the next fault: a healthy connection that
        # drops comes back in a second; one dropped before it delivered anything backs off
        sent = vinter.ws_messages
        await until(
            lambda: vinter.ws_messages >= sent + 4 * len(NAV_SYMBOLS),
            lambda: f"messages={vinter.ws_messages - sent}",
            timeout=30,
        )

    async def refused() -> None:
        vinter.ws_reject = [500, 503, (503, {"Retry-After": "1"}), 429, (429, {"Retry-After": "1"})]
        await vinter.drop_all("abrupt")

    async def rest_down_once() -> None:
        vinter.rest_fail = [500]  # the back-fill's first REST call fails (and is retried)
        await vinter.drop_all("abrupt")

    async def accept_and_close() -> None:
        vinter.accept_then_close = True
        attempts = vinter.ws_attempts
        await vinter.drop_all("abrupt")
        await wait_for(lambda: vinter.ws_attempts >= attempts + 2 * len(NAV_SYMBOLS), 30)
        vinter.accept_then_close = False

    async def stall() -> None:
        vinter.stall = True
        connects = vinter.ws_connects
        await wait_for(lambda: vinter.ws_connects >= connects + len(NAV_SYMBOLS), 30)
        vinter.stall = False

    await outage(lambda: vinter.drop_all("abrupt"))
    await outage(lambda: vinter.drop_all("clean", 1011))
    for inject in (refused, rest_down_once, accept_and_close, stall):
        await outage(inject)


async def grpc_faults(kaiko: KaikoSim) -> None:
    """Every gRPC fault in turn, each until a new stream delivers."""
    for inject in (grpc_unavailable, grpc_closed, grpc_stall):
        streams = len(kaiko.streams)
        await inject(kaiko)

        def delivering(n: int = streams) -> bool:
            return len(kaiko.streams) > n and len(kaiko.streams[-1].sent) >= 10

        await until(delivering, lambda: f"streams={len(kaiko.streams)}", timeout=60)


async def test_secrets_never_leak_through_upstream_faults(
    cluster_settings: KafkaSettings, tmp_path: Path
) -> None:
    ops = bridgeproc.free_port()
    ready = f"http://127.0.0.1:{ops}/readyz"
    async with (
        VinterSim(list(NAV_SYMBOLS), token=TOKEN, api_key=API_KEY, seed=9, rate=10) as vinter,
        make_kaiko() as kaiko,
    ):
        vinter.malformed_every = 9  # bad input too: dead letters must not carry secrets
        vinter.invalid_every = 7
        config = bridge_config(tmp_path, cluster_settings, vinter, kaiko, ops)
        proc = await bridgeproc.start_bridge(config)
        try:
            await bridgeproc.wait_status(ready, 200, timeout=90)
            async with asyncio.TaskGroup() as group:
                group.create_task(websocket_faults(vinter))
                group.create_task(grpc_faults(kaiko))
            await bridgeproc.wait_status(ready, 200, timeout=60)
            _, metrics = await bridgeproc.get(f"http://127.0.0.1:{ops}/metrics")
        finally:
            code, output = await bridgeproc.stop(proc, config)
    assert code == 0, output[-3000:]

    # The run went through every fault, at DEBUG.
    assert " DEBUG " in output
    assert "token=***" in output, "websockets logged its request line, redacted"
    evidence = ["code 1011", "no close frame", "HTTP 500", "HTTP 503", "HTTP 429", "Retry-After"]
    evidence += ["closed the connection", "stale: no message", "UNAVAILABLE", "stream stalled"]
    for trace in evidence:
        assert trace in output, f"no trace of {trace!r} in the bridge's output"
    assert "bridge_reconnects_total" in metrics
    # Nothing anywhere holds a secret.
    assert SENTINEL not in output
    assert SENTINEL not in metrics
    topics = cluster_settings.topics
    dead = 0
    for topic in (topics.nav_ticks, topics.vwap_ticks, topics.dlq, topics.state):
        records = await read_topic(cluster_settings.bootstrap_servers, topic, idle=1.0, timeout=60)
        dead += len(records) if topic == topics.dlq else 0
        for record in records:
            blob = b"".join(
                [record.key or b"", record.value or b""]
                + [name.encode() + value for name, value in record.headers]
            )
            assert SENTINEL.encode() not in blob, f"a secret in {topic}"
    assert dead > 0, "the dead-letter topic was exercised"
