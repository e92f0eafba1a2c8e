"""Which shard holds what: stable across processes, and every mark key found its owner."""

from __future__ import annotations

import zlib

import orjson

from bridge.config import Settings, VwapSubscription
from bridge.marks import MarkBook
from bridge.shard_state import parts_per_shard, shard_checkpoint
from bridge.shards import nav_name, plan_shards, shard_of, vwap_name


def settings(**sections: object) -> Settings:
    return Settings.model_validate(sections)


def test_the_shard_of_a_name_is_a_fixed_function_of_it() -> None:
    # A replica of another version must agree: the hash is CRC32, not Python's hash().
    assert shard_of("nav:vnfa-btca-15-r", 12) == zlib.crc32(b"nav:vnfa-btca-15-r") % 12
    assert {shard_of(nav_name(f"s{i}-r"), 12) for i in range(200)} == set(range(12))


def test_every_subscription_is_in_exactly_one_shard() -> None:
    nav = [f"s{i}-r" for i in range(50)]
    subs = [{"exchange": "cbse", "instrument_class": "spot", "code": f"c{i}"} for i in range(9)]
    s = settings(
        vinter={"symbols": nav},
        kaiko={"subscriptions": subs},
        settlement={"symbols": ["a-d", "b-d"]},
        shards={"count": 5},
    )
    plans = plan_shards(s)
    assert [p.shard for p in plans] == list(range(5))
    assert sorted(x for p in plans for x in p.nav_symbols) == sorted(nav)
    assert sum(len(p.vwap) for p in plans) == len(subs)
    assert sorted(x for p in plans for x in p.settlement_symbols) == ["a-d", "b-d"]
    for plan in plans:
        for sub in plan.vwap:
            assert shard_of(vwap_name(sub), 5) == plan.shard


def test_vwap_mark_keys_are_owned_through_wildcards_and_the_aggregate() -> None:
    s = settings(
        kaiko={
            "subscriptions": [
                {"exchange": "*", "instrument_class": "spot", "code": "eth-usd", "aggregate": "1m"}
            ]
        },
        shards={"count": 1},
    )
    (plan,) = plan_shards(s)
    assert plan.owns_vwap("cbse:spot:eth-usd|1m")
    assert plan.owns_vwap("binc:spot:eth-usd|1m")
    assert not plan.owns_vwap("cbse:spot:eth-usd|1s")  # another aggregate
    assert not plan.owns_vwap("cbse:perp:eth-usd|1m")
    assert not plan.owns_vwap("not a key")
    assert plan.vwap == [
        VwapSubscription(exchange="*", instrument_class="spot", code="eth-usd", aggregate="1m")
    ]


def test_a_shard_checkpoint_holds_every_mark_in_its_parts() -> None:
    book = MarkBook("t.nav")
    for i in range(40):
        book.advance(f"s{i}-r", 1000 + i)
    for count in (1, 3, 12, 40):
        records = shard_checkpoint(book, 2, count, {0: 7, 1: 9}, max_bytes=1_000_000)
        assert len(records) == parts_per_shard(count)
        assert all(key.startswith(f"marks:t.nav@2/{count}#") for key, _ in records)
        restored = MarkBook("t.nav")
        for _, value in records:
            doc = orjson.loads(value)
            assert doc["offsets"] == {"0": 7, "1": 9}
            restored.load(doc)
        assert restored.snapshot() == book.snapshot()
