"""The REST client against the simulator over real HTTP: paging, sorting, retries, auth."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from bridge.backoff import Backoff
from bridge.errors import AuthError, BadRecord, UpstreamError
from bridge.sources.vinter_rest import VinterRest
from bridgedev.sim.vinter import VinterSim

pytestmark = pytest.mark.integration

KEY = "rest-key-SENTINEL"


def client(sim: VinterSim, key: str = KEY) -> VinterRest:
    return VinterRest(sim.base_url, SecretStr(key), backoff=Backoff(initial=0.01, cap=0.05))


async def test_records_pages_past_the_cap_and_sorts() -> None:
    async with VinterSim(["x-r"], token="t", api_key=KEY, history_days=1, history_cap=4500) as sim:
        history = sim.history("x-r")
        assert len(history) == 4500
        start, end = history[10]["timestamp"], history[-5]["timestamp"]
        async with client(sim) as rest:
            got = await rest.records("real-time", "x-r", start_ms=start, end_ms=end)
            assert rest.requests > 3  # the cap forced the range to be split
    expected = [r for r in history if start <= r["timestamp"] < end]
    assert [r["timestamp"] for r in got] == sorted(r["timestamp"] for r in expected)
    assert got == sorted(expected, key=lambda r: r["timestamp"])


async def test_latest_without_limit() -> None:
    async with VinterSim(["x-d"], token="t", api_key=KEY, history_days=5) as sim:
        async with client(sim) as rest:
            latest = await rest.latest("daily", "x-d")
        assert latest == max(sim.history("x-d"), key=lambda r: r["timestamp"])


async def test_retries_429_and_5xx_then_succeeds() -> None:
    async with VinterSim(["x-d"], token="t", api_key=KEY, history_days=3) as sim:
        sim.rest_fail = [(429, {"Retry-After": "0"}), 500, 503]
        async with client(sim) as rest:
            data = await rest.fetch("daily", "x-d", limit=10)
            assert rest.requests == 4
        assert len(data) == 3


async def test_gives_up_after_a_run_of_500s() -> None:
    async with VinterSim(["x-d"], token="t", api_key=KEY, history_days=3) as sim:
        sim.rest_fail = [500] * 10
        async with client(sim) as rest:
            with pytest.raises(UpstreamError) as info:
                await rest.fetch("daily", "x-d", limit=10)
            assert rest.requests == 5
        assert info.value.retriable


async def test_401_is_an_auth_error_without_retry() -> None:
    async with (
        VinterSim(["x-d"], token="t", api_key=KEY, history_days=3) as sim,
        client(sim, key="wrong-key-SENTINEL") as rest,
    ):
        with pytest.raises(AuthError) as info:
            await rest.fetch("daily", "x-d")
        assert rest.requests == 1
    assert "vinter.api_key" in str(info.value)
    assert "SENTINEL" not in str(info.value)


async def test_truncated_body_is_bad_input() -> None:
    async with VinterSim(["x-d"], token="t", api_key=KEY, history_days=3) as sim:
        sim.rest_fail = ["truncated_json"]
        async with client(sim) as rest:
            with pytest.raises(BadRecord) as info:
                await rest.fetch("daily", "x-d", limit=10)
    assert info.value.reason == "bad_body"
    assert info.value.raw
