"""The Vinter simulator against the vendor docs, over real sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosedError, ConnectionClosedOK, InvalidStatus

from bridgedev.sim.vinter import MAX_RECORDS, SimClock, VinterSim

DAILY = "vnfa-btca-15-d"
HOURLY = "vnfa-btca-15-h"
REAL_TIME = "vnfa-btca-15-r"
TOKEN = "ws-test-token"
KEY = "rest-test-key"
START = datetime(2024, 3, 1, tzinfo=UTC)
WAIT = 3.0

DAILY_FIELDS = {
    "id", "symbol", "created_at", "open", "low", "high", "close", "timestamp", "date",
    "updated_at",
}  # fmt: skip
HOURLY_FIELDS = DAILY_FIELDS - {"updated_at"} | {"hour"}
REAL_TIME_FIELDS = {"id", "symbol", "created_at", "value", "timestamp", "date"}

Json = dict[str, Any]


def make_sim(**kwargs: Any) -> VinterSim:
    settings: dict[str, Any] = {
        "token": TOKEN,
        "api_key": KEY,
        "history_days": 30,
        "seed": 7,
        "clock": SimClock(start=START),
    }
    settings.update(kwargs)
    return VinterSim([DAILY, HOURLY, REAL_TIME], **settings)


@pytest.fixture
async def sim() -> AsyncIterator[VinterSim]:
    async with make_sim() as running:
        yield running


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT)) as session:
        yield session


async def rest(
    http: aiohttp.ClientSession,
    sim: VinterSim,
    params: dict[str, str],
    *,
    path: str = "/api/v3/nav_daily/",
    key: str | None = KEY,
) -> tuple[int, Json]:
    headers = {} if key is None else {"Authorization": key}
    async with http.get(sim.base_url + path, params=params, headers=headers) as response:
        return response.status, await response.json()


@asynccontextmanager
async def feed(sim: VinterSim, symbol: str, token: str = TOKEN) -> AsyncIterator[ClientConnection]:
    url = f"{sim.symbol_ws_url(symbol)}?token={token}"
    async with connect(
        url, proxy=None, open_timeout=WAIT, close_timeout=1, ping_interval=None
    ) as ws:
        yield ws


async def recv_text(ws: ClientConnection, timeout: float = WAIT) -> str:
    message = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(message, str), "messages are JSON text frames"
    return message


async def recv_json(ws: ClientConnection, timeout: float = WAIT) -> Any:
    return json.loads(await recv_text(ws, timeout))


def by_time(records: list[Json]) -> list[Json]:
    return sorted(records, key=lambda r: r["timestamp"])


# -- records ---------------------------------------------------------------------------------


@pytest.mark.integration
async def test_records_follow_the_documented_schemas(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    daily = sim.history(DAILY)
    assert len(daily) == 30
    assert daily[-1]["date"] == "2024-02-29", "pre-built history ends the day before the start"
    for record in daily:
        assert set(record) == DAILY_FIELDS
        assert isinstance(record["id"], int)
        assert record["id"] > 0
        assert record["created_at"] == record["updated_at"]
        assert record["low"] <= min(record["open"], record["close"])
        assert record["high"] >= max(record["open"], record["close"])
    first = daily[0]
    moment = datetime.fromtimestamp(first["timestamp"] / 1000, UTC)
    assert first["created_at"] == moment.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert first["date"] == moment.date().isoformat()

    hourly = sim.history(HOURLY)
    assert len(hourly) == 30 * 24
    for record in hourly:
        assert set(record) == HOURLY_FIELDS
        hour = datetime.fromtimestamp(record["timestamp"] / 1000, UTC)
        assert (record["date"], record["hour"]) == (hour.date().isoformat(), hour.hour)
    assert all(set(r) == REAL_TIME_FIELDS for r in sim.history(REAL_TIME))

    status, body = await rest(http, sim, {"symbol": HOURLY}, path="/api/v3/nav_hourly")
    assert status == 200
    assert body == {
        "result": "success",
        "message": "Success",
        "data": [hourly[-1]],
        "params": {"symbol": HOURLY},
    }
    status, body = await rest(http, sim, {"symbol": REAL_TIME}, path="/api/v3/nav_real_time/")
    assert (status, body["data"]) == (200, sim.history(REAL_TIME)[-1:])


@pytest.mark.integration
async def test_history_is_deterministic_from_the_seed() -> None:
    one, two, other = make_sim(), make_sim(), make_sim(seed=8)
    for s in (one, two, other):
        s.append(DAILY, 3)
    assert one.history(DAILY) == two.history(DAILY)
    assert one.history(DAILY) != other.history(DAILY)


# -- authentication ------------------------------------------------------------------------


@pytest.mark.integration
async def test_ws_handshake_rejects_bad_token_and_unknown_symbol(sim: VinterSim) -> None:
    for url, status in (
        (sim.symbol_ws_url(DAILY), 401),
        (f"{sim.symbol_ws_url(DAILY)}?token=wrong", 401),
        (f"{sim.symbol_ws_url('nope-d')}?token={TOKEN}", 404),
    ):
        with pytest.raises(InvalidStatus) as rejected:
            async with connect(url, proxy=None, open_timeout=WAIT):
                pass
        assert rejected.value.response.status_code == status
    assert (sim.ws_attempts, sim.ws_handshake_rejects, sim.ws_connects) == (3, 3, 0)


@pytest.mark.integration
async def test_rest_requires_the_raw_api_key(sim: VinterSim, http: aiohttp.ClientSession) -> None:
    for key in (None, "wrong", f"Token {KEY}", f"Bearer {KEY}"):
        status, body = await rest(http, sim, {"symbol": DAILY}, key=key)
        assert status == 401
        assert body["result"] == "error"
        assert body["message"]
    status, body = await rest(http, sim, {"symbol": DAILY})
    assert (status, body["result"]) == (200, "success")


# -- WebSocket feed --------------------------------------------------------------------------


@pytest.mark.integration
async def test_ws_sends_one_record_per_message_and_no_replay(sim: VinterSim) -> None:
    async with feed(sim, DAILY) as ws:
        appended = sim.append(DAILY, 3)
        received = [await recv_json(ws) for _ in range(3)]
        assert received == appended, "only records appended after connecting, one per message"
        with pytest.raises(TimeoutError):
            await recv_text(ws, timeout=0.2)
    assert sim.ws_connects == 1
    assert sim.emitted(DAILY) == appended


@pytest.mark.integration
async def test_ws_batch_sends_arrays(sim: VinterSim) -> None:
    sim.ws_batch = 4
    async with feed(sim, HOURLY) as ws:
        appended = sim.append(HOURLY, 10)
        messages = [await recv_json(ws) for _ in range(3)]
    assert all(isinstance(m, list) for m in messages)
    assert [len(m) for m in messages] == [4, 4, 2]
    assert [r for m in messages for r in m] == appended


@pytest.mark.integration
async def test_ws_drops_clean_and_abrupt_are_distinguishable(sim: VinterSim) -> None:
    async with feed(sim, DAILY) as one, feed(sim, HOURLY) as two:
        await sim.wait_sockets(2, timeout=WAIT)
        assert await sim.drop_all("clean") == 2
        for ws in (one, two):
            with pytest.raises(ConnectionClosedOK):
                await recv_text(ws)
            assert ws.close_code == 1001
            assert ws.protocol.close_rcvd is not None
            assert ws.protocol.close_rcvd.code == 1001

    async with feed(sim, DAILY) as ws:
        await sim.drop_all("abrupt")
        with pytest.raises(ConnectionClosedError):
            await recv_text(ws)
        assert ws.close_code == 1006
        assert ws.protocol.close_rcvd is None, "no close frame on an abrupt drop"

    sim.drop_after, sim.drop_mode = 2, "abrupt"
    async with feed(sim, DAILY) as ws:
        appended = sim.append(DAILY, 5)
        assert [await recv_json(ws), await recv_json(ws)] == appended[:2]
        with pytest.raises(ConnectionClosedError):
            await recv_text(ws)
        assert ws.close_code == 1006

    sim.drop_mode = "clean"
    async with feed(sim, DAILY) as ws:
        sim.append(DAILY, 3)
        await recv_json(ws)
        await recv_json(ws)
        with pytest.raises(ConnectionClosedOK):
            await recv_text(ws)
        assert ws.close_code == sim.drop_code == 1001
    assert len(sim.history(DAILY)) == 30 + 8, "dropped sockets lose nothing from history"


@pytest.mark.integration
async def test_ws_malformed_and_invalid_messages_are_extras(sim: VinterSim) -> None:
    sim.malformed_every = 3
    async with feed(sim, DAILY) as ws:
        appended = sim.append(DAILY, 4)
        texts = [await recv_text(ws) for _ in range(5)]
    decoded = []
    for position, text in enumerate(texts, start=1):
        if position == 3:
            with pytest.raises(json.JSONDecodeError):
                json.loads(text)
        else:
            decoded.append(json.loads(text))
    assert decoded == appended

    sim.malformed_every, sim.invalid_every = None, 2
    async with feed(sim, DAILY) as ws:
        appended = sim.append(DAILY, 3)
        messages = [await recv_json(ws) for _ in range(5)]
    assert [messages[0], messages[2], messages[4]] == appended
    bad_ts, no_symbol = messages[1], messages[3]
    assert isinstance(bad_ts["timestamp"], str)
    assert "symbol" not in no_symbol


@pytest.mark.integration
async def test_ws_reject_queue_and_accept_then_close(sim: VinterSim) -> None:
    sim.ws_reject = [503, (429, {"Retry-After": "2"})]
    with pytest.raises(InvalidStatus) as first:
        async with feed(sim, DAILY):
            pass
    with pytest.raises(InvalidStatus) as second:
        async with feed(sim, DAILY):
            pass
    assert first.value.response.status_code == 503
    assert second.value.response.status_code == 429
    assert second.value.response.headers["Retry-After"] == "2"
    async with feed(sim, DAILY) as ws:
        sim.append(DAILY)
        assert (await recv_json(ws))["symbol"] == DAILY

    sim.accept_then_close = True
    async with feed(sim, DAILY) as ws:
        with pytest.raises(ConnectionClosedOK):
            await recv_text(ws)
    assert (sim.ws_attempts, sim.ws_handshake_rejects, sim.ws_connects) == (4, 2, 2)


@pytest.mark.integration
async def test_stall_keeps_the_socket_open_and_silent(sim: VinterSim) -> None:
    sim.stall = True
    async with feed(sim, REAL_TIME) as ws:
        await sim.wait_sockets(1, REAL_TIME, timeout=WAIT)
        sim.append(REAL_TIME, 3)
        with pytest.raises(TimeoutError):
            await recv_text(ws, timeout=0.3)
        pong = await ws.ping()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(pong), 0.3)
        sim.stall = False
        appended = sim.append(REAL_TIME)
        assert await recv_json(ws) == appended[0]
        await asyncio.wait_for(ws.ping(), WAIT)
    assert len(sim.history(REAL_TIME)) == 5000 + 4


@pytest.mark.integration
async def test_rate_emits_with_or_without_sockets() -> None:
    async with make_sim(rate=100.0) as sim:
        before = len(sim.history(DAILY))
        await sim.wait_emitted(DAILY, 10, timeout=WAIT)
        assert len(sim.history(DAILY)) >= before + 10, "stored with no socket open"
        async with feed(sim, DAILY) as ws:
            live = [await recv_json(ws) for _ in range(5)]
        history = {r["id"]: r for r in sim.history(DAILY)}
        assert all(history[r["id"]] == r for r in live)
        assert [r["timestamp"] for r in live] == sorted(r["timestamp"] for r in live)
        assert len(sim.history(HOURLY)) > 30 * 24


# -- REST ------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_rest_returns_latest_only_without_limit(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    status, body = await rest(http, sim, {"symbol": DAILY})
    assert (status, body["data"]) == (200, sim.history(DAILY)[-1:])
    params = {"symbol": DAILY, "start_time": "2024-02-01", "end_time": "2024-02-10"}
    status, body = await rest(http, sim, params)
    assert status == 200
    assert [r["date"] for r in body["data"]] == ["2024-02-09"]
    assert body["params"] == params
    appended = sim.append(DAILY)
    status, body = await rest(http, sim, {"symbol": DAILY})
    assert body["data"] == appended


@pytest.mark.integration
async def test_rest_caps_at_2000_and_validates_limit(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    sim.append(HOURLY, 1500)
    history = sim.history(HOURLY)
    assert len(history) > MAX_RECORDS == 2000
    for limit in ("2000", "5000"):
        status, body = await rest(
            http, sim, {"symbol": HOURLY, "limit": limit}, path="/api/v3/nav_hourly/"
        )
        assert status == 200
        assert by_time(body["data"]) == history[-2000:]
    for limit in ("0", "-1", "abc", "1.5", ""):
        status, body = await rest(
            http, sim, {"symbol": HOURLY, "limit": limit}, path="/api/v3/nav_hourly/"
        )
        assert (status, body["result"]) == (400, "error"), limit


def _day(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%d")


def _seconds(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _millis(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


@pytest.mark.integration
@pytest.mark.parametrize("fmt", [_day, _seconds, _millis], ids=["date", "seconds", "millis"])
async def test_rest_range_is_start_inclusive_end_exclusive(
    sim: VinterSim, http: aiohttp.ClientSession, fmt: Callable[[datetime], str]
) -> None:
    start, end = datetime(2024, 2, 20, tzinfo=UTC), datetime(2024, 2, 22, tzinfo=UTC)
    start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    params = {"symbol": HOURLY, "start_time": fmt(start), "end_time": fmt(end), "limit": "2000"}
    status, body = await rest(http, sim, params, path="/api/v3/nav_hourly/")
    assert status == 200
    data = by_time(body["data"])
    assert data == [r for r in sim.history(HOURLY) if start_ms <= r["timestamp"] < end_ms]
    assert len(data) == 48
    assert data[0]["timestamp"] == start_ms
    assert data[-1]["timestamp"] == end_ms - 3_600_000

    status, body = await rest(http, sim, {**params, "limit": "5"}, path="/api/v3/nav_hourly/")
    assert by_time(body["data"]) == data[:5], "range + limit: the first records of the range"


@pytest.mark.integration
async def test_rest_time_precision_is_milliseconds(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    hour = datetime(2024, 2, 20, 5, tzinfo=UTC)
    params = {"symbol": HOURLY, "limit": "2"}
    status, body = await rest(
        http, sim, {**params, "start_time": _millis(hour + timedelta(milliseconds=1))},
        path="/api/v3/nav_hourly/",
    )  # fmt: skip
    assert status == 200
    assert [r["hour"] for r in by_time(body["data"])] == [6, 7]
    status, body = await rest(
        http, sim, {**params, "start_time": "2024-02-20T05:00:00.000Z",
                    "end_time": "2024-02-20T06:00:00.001Z"},
        path="/api/v3/nav_hourly/",
    )  # fmt: skip
    assert [r["hour"] for r in by_time(body["data"])] == [5, 6]


@pytest.mark.integration
@pytest.mark.parametrize(
    "value",
    [
        "2024-02-20T00:00:00",
        "2024-02-20 00:00:00Z",
        "2024-02-20T00:00:00.00Z",
        "2024-02-20T00:00:00.000000Z",
        "2024-02-20T00:00:00+00:00",
        "20240220",
        "2024-13-01",
        "1708387200000",
        "yesterday",
    ],
)
async def test_rest_rejects_other_time_formats(
    sim: VinterSim, http: aiohttp.ClientSession, value: str
) -> None:
    for name in ("start_time", "end_time"):
        status, body = await rest(http, sim, {"symbol": DAILY, name: value, "limit": "5"})
        assert (status, body["result"]) == (400, "error")


@pytest.mark.integration
async def test_rest_order_is_shuffled_so_clients_must_sort(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    expected = sim.history(HOURLY)[-50:]
    status, body = await rest(
        http, sim, {"symbol": HOURLY, "limit": "50"}, path="/api/v3/nav_hourly/"
    )
    assert status == 200
    assert body["data"] != expected
    assert by_time(body["data"]) == expected
    sim.shuffle = False
    status, body = await rest(
        http, sim, {"symbol": HOURLY, "limit": "50"}, path="/api/v3/nav_hourly/"
    )
    assert body["data"] == expected


@pytest.mark.integration
async def test_rest_paths_symbols_and_counters(sim: VinterSim, http: aiohttp.ClientSession) -> None:
    for path in ("/api/v3/nav_daily/", "/api/v3/nav_daily"):
        status, _ = await rest(http, sim, {"symbol": DAILY}, path=path)
        assert status == 200
    status, body = await rest(http, sim, {})
    assert (status, body["result"]) == (400, "error")
    for symbol, path in (("unknown-d", "/api/v3/nav_daily/"), (DAILY, "/api/v3/nav_hourly/")):
        status, body = await rest(http, sim, {"symbol": symbol}, path=path)
        assert (status, body["result"]) == (404, "error")
    assert sim.rest_requests == {"/api/v3/nav_daily/": 4, "/api/v3/nav_hourly/": 1}


@pytest.mark.integration
async def test_rest_fail_queue_forces_responses(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    sim.rest_fail = [(429, {"Retry-After": "1"}), (500, {}), ("truncated", {}), "truncated_json"]
    url = sim.base_url + "/api/v3/nav_daily/"
    params = {"symbol": DAILY, "limit": "10"}
    headers = {"Authorization": KEY}
    async with http.get(url, params=params, headers=headers) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "1"
    async with http.get(url, params=params, headers=headers) as response:
        assert response.status == 500
    async with http.get(url, params=params, headers=headers) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    async with http.get(url, params=params, headers=headers) as response:
        assert response.status == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(await response.text())
    status, body = await rest(http, sim, params)
    assert (status, len(body["data"])) == (200, 10)
    assert sim.rest_requests["/api/v3/nav_daily/"] == 5


# -- corrections and unofficial values -----------------------------------------------------


@pytest.mark.integration
async def test_correct_changes_close_and_updated_at(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    old = sim.history(DAILY)[-5]
    day = date.fromisoformat(str(old["date"]))
    new_close = round(float(old["high"]) * 1.05, 2)
    async with feed(sim, DAILY) as ws:
        corrected = sim.correct(DAILY, day, close=new_close)
        assert await recv_json(ws) == corrected
    params = {
        "symbol": DAILY,
        "start_time": day.isoformat(),
        "end_time": (day + timedelta(days=1)).isoformat(),
        "limit": "1",
    }
    status, body = await rest(http, sim, params)
    assert status == 200
    (served,) = body["data"]
    assert served == corrected
    assert served["id"] == old["id"]
    assert served["timestamp"] == old["timestamp"]
    assert served["close"] == served["high"] == new_close
    assert served["low"] == old["low"]
    assert served["updated_at"] > old["updated_at"]
    assert served["created_at"] == old["created_at"]


@pytest.mark.integration
async def test_unofficial_record_is_replaced_by_the_official_one(
    sim: VinterSim, http: aiohttp.ClientSession
) -> None:
    async with feed(sim, DAILY) as ws:
        provisional = sim.add_unofficial(DAILY, close=101.5)
        assert await recv_json(ws) == provisional
        assert provisional["id"] == 0
        assert provisional["close"] == 101.5
        status, body = await rest(http, sim, {"symbol": DAILY})
        assert body["data"] == [provisional]
        (official,) = sim.append(DAILY)
        assert await recv_json(ws) == official
    assert official["id"] != 0
    assert official["timestamp"] == provisional["timestamp"]
    status, body = await rest(http, sim, {"symbol": DAILY})
    assert (status, body["data"]) == (200, [official])
    assert [r["timestamp"] for r in sim.history(DAILY)].count(official["timestamp"]) == 1
    assert sim.emitted(DAILY) == [provisional, official]


# -- command line ----------------------------------------------------------------------------


@pytest.mark.integration
async def test_cli_prints_urls_without_the_token(http: aiohttp.ClientSession) -> None:
    secret = "cli-secret-token"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridgedev.sim.vinter", "--port", "0", "--symbols", "x-d,y-h",
        "--rate", "0", "--history-days", "2", "--token", secret, "--api-key", KEY,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        lines: list[str] = []
        while not lines or not lines[-1].startswith("running"):
            line = await asyncio.wait_for(proc.stdout.readline(), 10)
            assert line, "the simulator exited early"
            lines.append(line.decode())
        output = "".join(lines)
        assert secret not in output
        base = lines[0].split()[-1]
        assert base.startswith("http://127.0.0.1:")
        async with http.get(
            base + "/api/v3/nav_daily/", params={"symbol": "x-d", "limit": "5"},
            headers={"Authorization": KEY},
        ) as response:  # fmt: skip
            assert response.status == 200
            assert len((await response.json())["data"]) == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:  # generous: the whole suite shares two cores
            code = await asyncio.wait_for(proc.wait(), 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
    assert code == 0
