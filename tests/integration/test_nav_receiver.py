"""The receiver worker, with the NAV sockets' child: what it relays, flow control, its
death, and the token it holds."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.config import KafkaSettings
from bridge.errors import BadRecord
from bridge.normalize.nav import SOURCE_WS, TICK_TIMESTAMP, decode_message, nav_tick
from bridge.publish import Publisher
from bridge.sources.nav_receiver import SocketEnd, nav_worker
from bridge.sources.nav_ws import NavSocketSource
from bridge.sources.worker import DATA, HEADER, PAUSE_AT, Channel, Ended, Worker
from bridge.sources.worker_child import FLUSH_AT, FrameWriter, Pipe
from bridge.state import MarkBook
from bridgedev.sim.vinter import VinterSim
from tests.integration.test_nav_ws import (
    KEY,
    TOKEN,
    assert_exactly_once,
    caught_up,
    rest_client,
    supervised,
    ticks_through,
    vinter,
)
from tests.kafkautil import wait_for

pytestmark = pytest.mark.integration

A, B, C = "vnfa-flow-a-r", "vnfa-flow-b-r", "vnfa-flow-c-r"
OPTIONS: dict[str, Any] = {
    "open_timeout": 5,
    "ping_interval": 20,
    "ping_timeout": 20,
    "close_timeout": 1,
    "max_size": 1 << 20,
    "max_queue": 16,
}


def proc_file(pid: int, name: str) -> bytes:
    return Path(f"/proc/{pid}/{name}").read_bytes()


async def open_socket(receiver: Worker, sim: VinterSim, symbol: str) -> Channel:
    url = f"{sim.symbol_ws_url(symbol)}?token={TOKEN}"
    return await receiver.open({"url": url, "options": OPTIONS, "symbol": symbol})


def timestamps(items: list[Any]) -> list[int]:
    return [TICK_TIMESTAMP.unpack_from(payload)[0] for payload, _ in items]


async def test_an_unread_socket_is_paused_and_loses_nothing(nav_receiver: Worker) -> None:
    n = 20 * PAUSE_AT
    async with VinterSim([A, B, C], token=TOKEN, api_key=KEY, rate=0) as sim:
        sock = await open_socket(nav_receiver, sim, A)
        sim.append(A, n)
        await wait_for(lambda: sock.paused, timeout=20)
        # Each open is a barrier: the child handles commands in order, so once B is open it
        # has handled the pause; once C is open, at most one message was in hand meanwhile.
        await open_socket(nav_receiver, sim, B)
        queued = sock.queued[0]
        await open_socket(nav_receiver, sim, C)
        assert sock.queued[0] <= queued + 1
        assert queued < n // 2, "the child kept reading a paused socket"

        received: list[int] = []
        while len(received) < n:
            received += timestamps(await sock.read())
        assert received == [r["timestamp"] for r in sim.emitted(A)]
        sock.close()


async def test_a_socket_is_paused_on_the_bytes_it_has_queued_too() -> None:
    """Few large messages pause a socket as many small ones do: what waits in the bridge
    for one socket is bounded in bytes, not only in count."""
    limit = 64 * 1024
    async with (
        nav_worker(max_queued_bytes=limit) as receiver,
        VinterSim([A, B, C], token=TOKEN, api_key=KEY, rate=0) as sim,
    ):
        sock = await open_socket(receiver, sim, A)
        big = b'{"pad": "%s"}' % (b"x" * 20_000)  # bad input: refused, with all of it
        for _ in range(200):
            sim.send_raw(A, big)
        await wait_for(lambda: sock.paused, timeout=20)
        await open_socket(receiver, sim, B)  # a barrier: the child has handled the pause
        held = sock.queued
        await open_socket(receiver, sim, C)
        assert sock.queued[1] <= held[1] + len(big) + 1000  # one more, with its reason
        assert held[0] < PAUSE_AT  # paused on bytes, not on the count
        assert limit < held[1] < 200 * len(big) // 4
        got = 0
        while got < 200:
            got += len(await sock.read())
        assert not sock.paused
        sock.close()


async def test_every_message_comes_decoded_as_ticks_and_refusals(
    nav_receiver: Worker,
) -> None:
    """The child runs the NAV decoder on each message: the bridge gets ticks ready to publish
    and refusals ready to dead-letter, the same as `decode_message` makes of them."""
    async with VinterSim([A, B], token=TOKEN, api_key=KEY, rate=0) as sim:
        sock = await open_socket(nav_receiver, sim, A)
        [record] = sim.append(A, 1)
        other = orjson.dumps({**record, "symbol": B})  # valid, but not this socket's symbol
        bad = [other, b"{not json", b'{"symbol": "%s"}' % A.encode()]
        batch = orjson.dumps([record, {"symbol": A}])  # a tick and a refusal in one message
        for raw in [*bad, batch]:
            sim.send_raw(A, raw)
        items: list[Any] = []
        while len(items) < 3 + len(bad):
            items += await sock.read()
        payload = items[0][0]
        assert TICK_TIMESTAMP.unpack_from(payload)[0] == record["timestamp"]
        event = nav_tick(record, source=SOURCE_WS, expected_symbol=A)
        assert payload[TICK_TIMESTAMP.size :] == event.to_json()
        refusals = [item for item, _ in items if isinstance(item, BadRecord)]
        expected = [r for raw in [*bad, batch] for r in decode_message(raw, A)[1]]
        assert [(r.reason, r.detail, r.raw) for r in refusals] == [
            (r.reason, r.detail, r.raw) for r in expected
        ]
        assert [r.reason for r in refusals] == [
            "symbol_mismatch",
            "bad_json",
            "missing_field",
            "missing_field",
        ]
        kinds = [isinstance(item, bytes) for item, _ in items]
        assert kinds == [True, False, False, False, True, False]
        sock.close()


async def test_frames_reach_the_pipe_every_flush_at_bytes_within_one_turn() -> None:
    """A burst's messages go to the bridge while the child still works through them: every
    `FLUSH_AT` bytes, not only at the end of the event-loop turn (which, in a burst, came
    after thousands of messages, the bridge idle meanwhile)."""
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    out, pipe = await asyncio.get_running_loop().connect_write_pipe(Pipe, os.fdopen(write_fd, "wb"))
    try:
        frames = FrameWriter(out, pipe)
        payload = b"x" * 500
        frames.put(DATA, 1, payload)
        with pytest.raises(BlockingIOError):  # less than FLUSH_AT: gathered for now
            os.read(read_fd, 1 << 20)
        count = 1
        while count * len(payload) < FLUSH_AT:
            frames.put(DATA, 1, payload)
            count += 1
        early = os.read(read_fd, 1 << 20)  # still in the same turn
        frames.put(DATA, 2, b"tail")
        # the turn ends: the rest is written
        data = early

        def drained() -> bool:
            nonlocal data
            with contextlib.suppress(BlockingIOError):
                data += os.read(read_fd, 1 << 20)
            return data.endswith(b"tail")

        await wait_for(drained, timeout=5)
    finally:
        out.close()
        os.close(read_fd)
    assert len(early) >= min(FLUSH_AT, 4096)
    parsed, pos = [], 0
    while pos < len(data):
        kind, sid, length, _ = HEADER.unpack_from(data, pos)
        pos += HEADER.size + length
        parsed.append((kind, sid, data[pos - length : pos]))
    assert parsed == [(DATA, 1, payload)] * count + [(DATA, 2, b"tail")]


async def test_the_token_travels_on_stdin_only(nav_receiver: Worker) -> None:
    async with VinterSim([A], token=TOKEN, api_key=KEY, rate=0) as sim:
        sock = await open_socket(nav_receiver, sim, A)
        (pid,) = nav_receiver.pids
        for what in ("cmdline", "environ"):
            assert b"SENTINEL" not in proc_file(pid, what)
        assert "SENTINEL" not in repr(sock)
        sock.close()


async def test_a_refused_handshake_ends_the_socket_with_its_status(
    nav_receiver: Worker,
) -> None:
    async with VinterSim([A], token=TOKEN, api_key=KEY, rate=0) as sim:
        sim.ws_reject = [(429, {"Retry-After": "3"})]
        with pytest.raises(Ended) as info:
            await open_socket(nav_receiver, sim, A)
    end = SocketEnd.of(info.value)
    assert (end.status, end.retry_after) == (429, "3")
    assert "SENTINEL" not in str(info.value)


async def test_a_dead_receiver_is_restarted_and_its_sockets_back_filled(
    kafka_settings: KafkaSettings, nav_receiver: Worker
) -> None:
    symbols = [A, B]
    book = MarkBook(kafka_settings.topics.nav_ticks)
    async with (
        VinterSim(symbols, token=TOKEN, api_key=KEY, seed=5, rate=40) as sim,
        rest_client(sim) as rest,
        Publisher(kafka_settings) as publisher,
    ):
        settings = vinter(sim)
        sources = [
            NavSocketSource(s, settings, publisher, book, rest, receiver=nav_receiver)
            for s in symbols
        ]
        async with supervised(sources) as tasks:
            await wait_for(lambda: all(s.published >= 20 for s in sources))
            (first,) = nav_receiver.pids
            os.kill(first, signal.SIGKILL)
            await wait_for(lambda: nav_receiver.pids not in ([], [first]), timeout=20)
            await wait_for(lambda: all(s.sessions >= 2 and s.backfilled > 0 for s in sources))
            await wait_for(lambda: all(s.published >= 60 for s in sources))
            await caught_up(sim, book, symbols)
            assert not any(task.done() for task in tasks)
        await publisher.flush(30)

    docs = await ticks_through(kafka_settings, sim, symbols)
    for symbol in symbols:
        assert assert_exactly_once(docs, sim, symbol) >= 60


async def test_a_transport_that_fails_ends_its_channel_and_the_child_serves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in a transport ends that channel with an error the source can raise (and the
    child's log says which), never a channel that hangs or a child that dies."""
    async with Worker("tests.integration.echo_transport", name="echo") as worker:
        with pytest.raises(Ended) as before:
            await worker.open({"fail_before_open": True})
        assert (before.value.report, before.value.reason) == (None, "the echo receiver failed")

        channel = await worker.open({"data": ["a", "b"], "fail": True})
        received, after = await read_to_end(channel)
        assert [payload for payload, _ in received] == [b"a", b"b"]
        assert after.report is None

        (pid,) = worker.pids
        fine = await worker.open({"data": ["c"], "report": {"ok": True}})
        received, ended = await read_to_end(fine)
        assert [payload for payload, _ in received] == [b"c"]
        assert ended.report == {"ok": True}
        assert worker.pids == [pid]  # the same child served on
    await wait_for(lambda: "broken after it opened" in caplog.text, timeout=5)
    assert "RuntimeError" in caplog.text


async def read_to_end(channel: Channel) -> tuple[list[Any], Ended]:
    """Everything a channel received, and how it ended."""
    received: list[Any] = []
    async with asyncio.timeout(20):
        while True:
            try:
                received += await channel.read()
            except Ended as ended:
                return received, ended
