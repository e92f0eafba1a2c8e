"""The Kaiko VWAP simulator against the vendor docs, with a real gRPC client over TLS."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import sys
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from kaikosdk import sdk_pb2_grpc
from kaikosdk.core import instrument_criteria_pb2
from kaikosdk.stream.aggregates_vwap_v1 import request_pb2

from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.tls import TestCA

pytestmark = pytest.mark.integration

API_KEY = "vwap-test-key"
UNIVERSE = [
    ("cbse", "spot", "btc-usd"),
    ("binc", "spot", "btc-usd"),
    ("binc", "spot", "eth-usdt"),
]
START = datetime(2024, 8, 9, 13, 47, 19, 420000, tzinfo=UTC)
WAIT = 5.0
UID_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")


def request(
    exchange: str = "*",
    instrument_class: str = "spot",
    code: str = "btc-usd",
    aggregate: str = "1s",
) -> Any:
    return request_pb2.StreamAggregatesVWAPRequestV1(
        aggregate=aggregate,
        instrument_criteria=instrument_criteria_pb2.InstrumentCriteria(
            exchange=exchange, instrument_class=instrument_class, code=code
        ),
    )


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA()


@pytest.fixture
async def sim(ca: TestCA) -> AsyncIterator[KaikoSim]:
    async with KaikoSim(api_key=API_KEY, instruments=UNIVERSE, start=START, seed=7, ca=ca) as s:
        yield s


@asynccontextmanager
async def connect(sim: KaikoSim, key: str | None = API_KEY) -> AsyncIterator[Any]:
    creds = grpc.ssl_channel_credentials(sim.ca_pem)
    if key is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(key))
    async with grpc.aio.secure_channel(sim.target, creds) as channel:
        yield sdk_pb2_grpc.StreamAggregatesVWAPServiceV1Stub(channel)


@pytest.fixture
async def stub(sim: KaikoSim) -> AsyncIterator[Any]:
    async with connect(sim) as s:
        yield s


async def take(call: Any, n: int) -> list[Any]:
    async def read_n() -> list[Any]:
        out = []
        for _ in range(n):
            msg = await call.read()
            assert msg is not grpc.aio.EOF
            out.append(msg)
        return out

    return await asyncio.wait_for(read_n(), WAIT)


async def read_until_error(call: Any) -> tuple[list[Any], grpc.aio.AioRpcError]:
    """Read messages until the stream fails; returns them and the error."""
    got: list[Any] = []

    async def loop() -> grpc.aio.AioRpcError:
        while True:
            try:
                msg = await call.read()
            except grpc.aio.AioRpcError as exc:
                return exc
            assert msg is not grpc.aio.EOF, "stream ended with OK, expected an error"
            got.append(msg)

    err = await asyncio.wait_for(loop(), WAIT)
    return got, err


def uid_time(uid: str) -> datetime:
    return datetime.strptime(uid, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def as_record(msg: Any) -> tuple[str, str, str, str, str, float]:
    return (msg.exchange, getattr(msg, "class"), msg.code, msg.aggregate, msg.uid, msg.price)


async def test_wrong_or_missing_key_is_unauthenticated(sim: KaikoSim) -> None:
    for key in ("not-the-key", None):
        async with connect(sim, key) as s:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await take(s.Subscribe(request()), 1)
            assert info.value.code() is grpc.StatusCode.UNAUTHENTICATED
            assert API_KEY not in (info.value.details() or "")
    assert sim.unauthenticated == 2
    assert sim.subscribe_calls == 2
    assert sim.streams == []
    assert sim.messages_sent == 0


async def test_wildcard_exchange_matches_two_of_three(sim: KaikoSim, stub: Any) -> None:
    msgs = await take(stub.Subscribe(request("*", "spot", "btc-usd", "1s")), 6)
    assert {m.exchange for m in msgs} == {"cbse", "binc"}
    assert [m.exchange for m in msgs] == ["cbse", "binc"] * 3  # round-robin, universe order
    for m in msgs:
        assert getattr(m, "class") == "spot"
        assert m.code == "btc-usd"
        assert m.aggregate == "1s"
        assert m.sequence_id == ""
        assert m.price > 0
        assert UID_RE.match(m.uid)
    assert sim.streams[0].instruments == (UNIVERSE[0], UNIVERSE[1])
    assert sim.active_streams == 1


async def test_uids_strictly_increase_per_instrument(sim: KaikoSim, stub: Any) -> None:
    msgs = await take(stub.Subscribe(request("*", "*", "*", "1m")), 30)
    per: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for m in msgs:
        per[(m.exchange, m.code)].append(m)
    assert len(per) == 3
    for series in per.values():
        starts = [uid_time(m.uid) for m in series]
        assert starts[0] == datetime(2024, 8, 9, 13, 47, tzinfo=UTC)  # START floored to 1m
        assert all(b - a == timedelta(minutes=1) for a, b in itertools.pairwise(starts))
        for m, start in zip(series, starts, strict=True):
            event = m.ts_event.ToDatetime(tzinfo=UTC)
            assert start + timedelta(minutes=1) < event < start + timedelta(minutes=1, seconds=1)
    assert any(m.ts_event.nanos % 1000 for m in msgs)  # nanosecond precision


async def test_abort_after_gives_unavailable_after_exactly_n(sim: KaikoSim, stub: Any) -> None:
    sim.abort_after(5)
    got, err = await read_until_error(stub.Subscribe(request()))
    assert len(got) == 5
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert sim.streams[0].status is grpc.StatusCode.UNAVAILABLE
    assert len(sim.streams[0].sent) == 5
    got, err = await read_until_error(stub.Subscribe(request()))  # applies to every stream
    assert len(got) == 5


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.PERMISSION_DENIED,
    ],
)
async def test_abort_next_fails_once(sim: KaikoSim, stub: Any, code: grpc.StatusCode) -> None:
    sim.rate = 500
    sim.abort_next(code, after=3, details="simulated")
    got, err = await read_until_error(stub.Subscribe(request()))
    assert len(got) == 3
    assert err.code() is code
    assert err.details() == "simulated"
    msgs = await take(stub.Subscribe(request()), 10)  # the fault was used up
    assert len(msgs) == 10


async def test_fail_subscribe_refuses_before_any_message(sim: KaikoSim, stub: Any) -> None:
    sim.fail_subscribe(grpc.StatusCode.PERMISSION_DENIED, times=2)
    for _ in range(2):
        got, err = await read_until_error(stub.Subscribe(request()))
        assert got == []
        assert err.code() is grpc.StatusCode.PERMISSION_DENIED
    assert len(await take(stub.Subscribe(request()), 3)) == 3
    assert len(sim.streams) == 1


async def test_stall_sends_nothing_then_resumes(sim: KaikoSim, stub: Any) -> None:
    sim.stall()
    call = stub.Subscribe(request())
    first = asyncio.create_task(call.read())
    done, _ = await asyncio.wait({first}, timeout=0.5)
    assert not done
    assert sim.active_streams == 1
    assert sim.messages_sent == 0
    sim.unstall()
    msg = await asyncio.wait_for(first, WAIT)
    assert msg.exchange == "cbse"

    sim.rate = 200  # now stall an open, flowing stream
    await take(call, 3)
    sim.stall()
    await asyncio.sleep(0.05)
    sent = sim.messages_sent
    await asyncio.sleep(0.4)
    assert sim.messages_sent == sent
    assert sim.active_streams == 1


async def test_invalid_requests(sim: KaikoSim, stub: Any) -> None:
    for req in (
        request(exchange=""),
        request(instrument_class=""),
        request(code=""),
        request_pb2.StreamAggregatesVWAPRequestV1(aggregate="1s"),  # no criteria at all
        request(aggregate=""),
        request(aggregate="7x"),
        request(aggregate="5m"),  # well-formed, not offered
    ):
        got, err = await read_until_error(stub.Subscribe(req))
        assert got == []
        assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert sim.invalid_requests == 7
    assert sim.streams == []


async def test_no_match_stays_open_and_silent(sim: KaikoSim, stub: Any) -> None:
    call = stub.Subscribe(request("krkn", "spot", "btc-usd"))
    read = asyncio.create_task(call.read())
    done, _ = await asyncio.wait({read}, timeout=0.4)
    assert not done
    assert sim.active_streams == 1
    assert sim.streams[0].instruments == ()
    call.cancel()
    async with asyncio.timeout(WAIT):
        await sim.wait_until_idle()
    assert sim.streams[0].status is grpc.StatusCode.CANCELLED


async def test_resubscribe_continues_and_resend_repeats(sim: KaikoSim, stub: Any) -> None:
    cbse = request("cbse", "spot", "btc-usd")
    sim.abort_after(5)
    first, _ = await read_until_error(stub.Subscribe(cbse))
    sim.abort_after(3)
    second, _ = await read_until_error(stub.Subscribe(cbse))
    # Live data: the new stream carries on from the instrument's clock, no replay, no gap.
    uids = [m.uid for m in first + second]
    assert [uid_time(u) for u in uids] == [
        datetime(2024, 8, 9, 13, 47, 19 + i, tzinfo=UTC) for i in range(8)
    ]
    sim.resend_on_reconnect = 2
    sim.abort_after(4)
    third, _ = await read_until_error(stub.Subscribe(cbse))
    assert [as_record(m) for m in third[:2]] == [as_record(m) for m in second[-2:]]
    assert uid_time(third[2].uid) == uid_time(second[-1].uid) + timedelta(seconds=1)


async def test_close_connections_kills_stream_and_serves_again(sim: KaikoSim, stub: Any) -> None:
    sim.rate = 200
    call = stub.Subscribe(request("cbse", "spot", "btc-usd"))
    before = await take(call, 3)
    port = sim.port
    await sim.close_connections()
    _, err = await read_until_error(call)
    assert err.code() is grpc.StatusCode.UNAVAILABLE
    assert sim.active_streams == 0
    assert sim.port == port
    assert sim.server_starts == 2
    after = await take(stub.Subscribe(request("cbse", "spot", "btc-usd")), 2)  # same channel
    assert uid_time(after[0].uid) > uid_time(before[-1].uid)


async def test_records_match_what_arrived(sim: KaikoSim, stub: Any) -> None:
    sim.abort_after(200)
    got, _ = await read_until_error(stub.Subscribe(request("*", "*", "*", "1h")))
    assert len(got) == 200
    assert [as_record(m) for m in got] == [tuple(r) for r in sim.streams[0].sent]
    assert sim.sent == sim.streams[0].sent
    assert sim.messages_sent == 200


async def test_overlapping_streams_agree_on_values(sim: KaikoSim, stub: Any) -> None:
    sim.rate = 400
    a = stub.Subscribe(request("*", "spot", "btc-usd"))
    b = stub.Subscribe(request("cbse", "spot", "*"))
    got_a, got_b = await asyncio.gather(take(a, 20), take(b, 20))
    seen = {(m.exchange, m.code, m.uid): m.price for m in got_a}
    shared = [m for m in got_b if (m.exchange, m.code, m.uid) in seen]
    assert shared
    assert all(seen[(m.exchange, m.code, m.uid)] == m.price for m in shared)


async def test_rate_paces_messages(sim: KaikoSim, stub: Any) -> None:
    sim.rate = 40
    call = stub.Subscribe(request())
    await take(call, 1)
    started = time.monotonic()
    await take(call, 10)
    elapsed = time.monotonic() - started
    assert 0.2 < elapsed < 3.0  # 10 x 25 ms


async def test_ca_file_is_usable_as_root(ca: TestCA, sim: KaikoSim, tmp_path: Path) -> None:
    path = ca.write_ca(tmp_path / "tls" / "ca.pem")
    pem = path.read_bytes()
    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    assert b"PRIVATE KEY" not in pem
    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(pem), grpc.access_token_call_credentials(API_KEY)
    )
    async with grpc.aio.secure_channel(f"localhost:{sim.port}", creds) as channel:
        s = sdk_pb2_grpc.StreamAggregatesVWAPServiceV1Stub(channel)
        assert len(await take(s.Subscribe(request()), 2)) == 2


async def test_cli_serves_and_never_prints_the_key(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    secret = "cli-secret-key-1234"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridgedev.sim.kaiko", "--port", "0", "--rate", "0",
        "--instrument", "cbse:spot:btc-usd", "--instrument", "krkn:spot:btc-usd",
        "--ca-out", str(ca_file),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "KAIKO_API_KEY": secret},
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        assert line.startswith("listening on 127.0.0.1:")
        target = line.split()[2]
        creds = grpc.composite_channel_credentials(
            grpc.ssl_channel_credentials(ca_file.read_bytes()),
            grpc.access_token_call_credentials(secret),
        )
        async with grpc.aio.secure_channel(target, creds) as channel:
            s = sdk_pb2_grpc.StreamAggregatesVWAPServiceV1Stub(channel)
            msgs = await take(s.Subscribe(request("*", "spot", "btc-usd")), 4)
        assert {m.exchange for m in msgs} == {"cbse", "krkn"}
    finally:
        if proc.returncode is None:
            proc.terminate()
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert secret not in (line + out.decode() + err.decode())
