"""The frozen dataclasses readers get, one per event type, and the builders that fill them
from an event's envelope and data. Plain data: no validation, no Kafka.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge import events


@dataclass(frozen=True, slots=True, kw_only=True)
class ConsumedEvent:
    """An event read from Kafka: its CloudEvents envelope, its data and where it was read.

    `data` is the event's data as of `version`, the version the reader is written for (older
    events are upcast to it); `written_version` is the version on the wire. Types without a
    class of their own (an event type added by an extra schema directory) arrive as this.
    """

    specversion: str
    id: str
    source: str
    type: str
    time: str
    subject: str
    datacontenttype: str
    dataschema: str
    data: Mapping[str, Any] = field(hash=False)
    version: int
    written_version: int
    topic: str
    partition: int
    offset: int
    key: str | None
    kafka_timestamp: int
    """The Kafka record's timestamp, Unix milliseconds."""
    headers: tuple[tuple[str, bytes], ...] = field(hash=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class NavTick(ConsumedEvent):
    """`vinter.nav.tick`: one NAV record of any frequency (`close` or `value` is set)."""

    symbol: str
    frequency: str
    timestamp: int
    """Upstream calculation time, Unix milliseconds."""
    official: bool
    upstream_id: int | None
    open: float | None
    high: float | None
    low: float | None
    close: float | None
    value: float | None
    date: str | None
    hour: int | None
    updated_at: str | None = None
    revision: int = 1
    """1 for the first content published for (symbol, timestamp), then 2, 3, ... when the
    upstream sends other content for it (an official value after an indicative one, a
    correction). Events of schema version 1 are revision 1."""
    supersedes: int | None = None
    """The revision this one replaces (None for revision 1)."""

    @property
    def nav(self) -> float:
        """The NAV: `close` for daily and hourly records, `value` for real-time ones."""
        price = self.close if self.close is not None else self.value
        assert price is not None  # noqa: S101 - the schema requires one of them
        return price


@dataclass(frozen=True, slots=True, kw_only=True)
class VwapTick(ConsumedEvent):
    """`kaiko.vwap.tick`: one VWAP interval of one instrument."""

    exchange: str
    instrument_class: str
    code: str
    aggregate: str
    uid: str
    price: float
    ts_event: str
    ts_event_ns: int
    sequence_id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Settlement(ConsumedEvent):
    """`vinter.nav.settlement`: an official daily close; a correction is the next revision."""

    symbol: str
    date: str
    revision: int
    supersedes: int | None
    close: float
    open: float | None
    high: float | None
    low: float | None
    upstream_id: int
    timestamp: int
    updated_at: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Gap(ConsumedEvent):
    """`bridge.gap`: intervals between `last_before` and `first_after` may be missing."""

    upstream: str
    instrument: str
    aggregate: str | None
    reason: str
    last_before: str | None
    first_after: str
    detected_at: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter(ConsumedEvent):
    """`bridge.deadletter`: upstream input the bridge refused, with the reason."""

    upstream: str
    reason: str
    detail: str
    raw: str
    raw_encoding: str
    record_key: str | None
    event_type: str | None
    received_at: str

    def raw_bytes(self) -> bytes:
        """The refused input exactly as received."""
        if self.raw_encoding == "base64":
            return base64.b64decode(self.raw)
        return self.raw.encode("utf-8")


def _nav(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return NavTick(
        **common,
        symbol=d["symbol"],
        frequency=d["frequency"],
        timestamp=d["timestamp"],
        official=d["official"],
        upstream_id=d.get("id"),
        open=d.get("open"),
        high=d.get("high"),
        low=d.get("low"),
        close=d.get("close"),
        value=d.get("value"),
        date=d.get("date"),
        hour=d.get("hour"),
        updated_at=d.get("updated_at"),
        revision=d.get("revision") or 1,
        supersedes=d.get("supersedes"),
    )


def _vwap(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return VwapTick(
        **common,
        exchange=d["exchange"],
        instrument_class=d["instrument_class"],
        code=d["code"],
        aggregate=d["aggregate"],
        uid=d["uid"],
        price=d["price"],
        ts_event=d["ts_event"],
        ts_event_ns=d["ts_event_ns"],
        sequence_id=d["sequence_id"],
    )


def _settlement(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return Settlement(
        **common,
        symbol=d["symbol"],
        date=d["date"],
        revision=d["revision"],
        supersedes=d["supersedes"],
        close=d["close"],
        open=d.get("open"),
        high=d.get("high"),
        low=d.get("low"),
        upstream_id=d["upstream_id"],
        timestamp=d["timestamp"],
        updated_at=d["updated_at"],
    )


def _gap(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return Gap(
        **common,
        upstream=d["source"],
        instrument=d["key"],
        aggregate=d.get("aggregate"),
        reason=d["reason"],
        last_before=d["last_before"],
        first_after=d["first_after"],
        detected_at=d["detected_at"],
    )


def _dead_letter(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return DeadLetter(
        **common,
        upstream=d["source"],
        reason=d["reason"],
        detail=d["detail"],
        raw=d["raw"],
        raw_encoding=d["raw_encoding"],
        record_key=d.get("key"),
        event_type=d.get("event_type"),
        received_at=d["received_at"],
    )


def _generic(common: dict[str, Any], d: Mapping[str, Any]) -> ConsumedEvent:
    return ConsumedEvent(**common)


Builder = Callable[[dict[str, Any], Mapping[str, Any]], ConsumedEvent]
BUILDERS: dict[str, Builder] = {
    events.NAV_TICK: _nav,
    events.VWAP_TICK: _vwap,
    events.SETTLEMENT: _settlement,
    events.GAP: _gap,
    events.DEAD_LETTER: _dead_letter,
}
