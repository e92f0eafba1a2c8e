"""Which shard holds a subscription: a stable hash of its name, the same in every replica
and every version, so that a replica holding shard n holds the same subscriptions as the
one before it."""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from functools import lru_cache

from bridge.config import Settings, VwapSubscription


def shard_of(name: str, count: int) -> int:
    """The shard (0 to `count` - 1) of the subscription `name`."""
    return zlib.crc32(name.encode()) % count


def nav_name(symbol: str) -> str:
    return f"nav:{symbol}"


def vwap_name(sub: VwapSubscription) -> str:
    return f"vwap:{sub.exchange}:{sub.instrument_class}:{sub.code}:{sub.aggregate}"


def settlement_name(symbol: str) -> str:
    return f"settlement:{symbol}"


def _field_matches(pattern: str, value: str) -> bool:
    return pattern in ("*", value)


@dataclass(frozen=True, eq=False)  # hashed by identity: one plan per shard
class ShardPlan:
    """The subscriptions of one shard, and which mark keys of the output topics are its own
    (a VWAP subscription may be a wildcard, so its keys are matched, not listed)."""

    shard: int
    nav_symbols: list[str] = field(default_factory=list)
    vwap: list[VwapSubscription] = field(default_factory=list)
    settlement_symbols: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.nav_symbols or self.vwap or self.settlement_symbols)

    def owns_nav(self, key: str) -> bool:
        return key in self.nav_symbols

    def owns_vwap(self, key: str) -> bool:
        """Whether the VWAP mark key `exchange:class:code|aggregate` is one of this shard's."""
        return _owns_vwap(self, key)


@lru_cache(maxsize=100_000)
def _owns_vwap(plan: ShardPlan, key: str) -> bool:
    instrument, _, aggregate = key.rpartition("|")
    parts = instrument.split(":", 2)
    if len(parts) != 3:
        return False
    exchange, instrument_class, code = parts
    return any(
        sub.aggregate == aggregate
        and _field_matches(sub.exchange, exchange)
        and _field_matches(sub.instrument_class, instrument_class)
        and _field_matches(sub.code, code)
        for sub in plan.vwap
    )


def plan_shards(settings: Settings) -> list[ShardPlan]:
    """Every shard's subscriptions, from the configuration alone."""
    count = settings.shards.count
    plans = [ShardPlan(n) for n in range(count)]
    for symbol in dict.fromkeys(settings.vinter.symbols):
        plans[shard_of(nav_name(symbol), count)].nav_symbols.append(symbol)
    for sub in settings.kaiko.subscriptions:
        plans[shard_of(vwap_name(sub), count)].vwap.append(sub)
    for symbol in dict.fromkeys(settings.settlement.symbols):
        plans[shard_of(settlement_name(symbol), count)].settlement_symbols.append(symbol)
    return plans
