"""The decoders' proofs: every input becomes valid events or refusals with a reason.

* property tests: 10,000 generated inputs per parser (random bytes, arbitrary JSON, near-valid
  records with fields broken, arbitrary proto field values). Each input either becomes events
  that match their schema and serialize (which is what lets the publisher skip validating
  them: `verified`), or is refused with `BadRecord` and a reason code whose dead letter
  matches its schema too. Any other exception fails the test.
* a table of hand-written malformed cases (`tests/malformed.py`), each with its reason.

The same inputs end to end, through the bridge as a process on a real broker:
`tests/faults/test_bad_input.py`.
"""

from __future__ import annotations

import json
import math
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge import validation
from bridge.errors import BadRecord
from bridge.events import NAV_TICK, SETTLEMENT, VWAP_TICK, Event, dead_letter
from bridge.normalize.nav import MAX_MS, MIN_MS, decode_message, decode_records, frequency_of
from bridge.normalize.settlement_book import SettlementBook
from bridge.normalize.vwap import MAX_NS, MIN_NS, decode_response
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridge.sources.vinter_rest import parse_body, split_page
from tests.malformed import (
    DOC_TS_EVENT,
    DOC_VWAP,
    BodyCase,
    RecordCase,
    VwapCase,
    WsCase,
    body_cases,
    daily_record_cases,
    dumps,
    envelope,
    rest_nav_body_cases,
    vwap_cases,
    vwap_message,
    ws_cases,
)
from tests.samples import DAILY, HOURLY, NAV_FIELDS, REALTIME

REASON = re.compile(r"[a-z][a-z_]*")
Outcome = Event | BadRecord

# -- what each decoder makes of one input: the functions the sources run --------------------


def ws_outcomes(message: str | bytes, symbol: str) -> list[Outcome]:
    """One WebSocket message, decoded as the receiver child decodes it."""
    raw = message.encode("utf-8", "surrogatepass") if isinstance(message, str) else message
    events, refused = decode_message(raw, symbol)
    assert all(r.raw is not None for r in refused)  # each refusal holds its input
    return [*events, *refused]


def rest_outcomes(body: bytes, symbol: str) -> list[Outcome]:
    """One REST body of the symbol's endpoint: envelope, page, then NAV ticks (hourly and
    real-time back-fill) or a settlement plan (daily), re-planned to check it is idempotent."""
    refused: BadRecord | None
    try:
        page = parse_body(body)
    except BadRecord as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert refused.raw == body  # the whole body goes to the dead letter
        return [refused]
    timed, unmappable, outside = split_page(page, MIN_MS, MAX_MS + 1)
    assert outside == 0
    assert len(timed) + len(unmappable) == len(page)  # every item goes on, none is lost
    records = timed + unmappable
    if frequency_of(symbol) != "daily":
        ticks, bad = decode_records(records, symbol)
        assert all(r.raw is not None for r in bad)
        return [*(event for event, _ in ticks), *bad]
    book = SettlementBook()
    plan = book.plan(symbol, records)
    book.apply([plan])
    again = book.plan(symbol, records)
    assert not again.events, "the same poll twice published a second revision"
    assert not again.refused, "a refused record was dead-lettered twice"
    refusals = [BadRecord(r.reason, r.detail, raw=r.raw) for r in plan.refused]
    return [*plan.events, *refusals]


def vwap_outcome(msg: Any) -> Outcome:
    """One response as the gateway would send it (serialized), decoded."""
    refused: BadRecord | None
    try:
        event, key, mark = decode_response(msg.SerializeToString())
    except BadRecord as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert refused.raw is not None
        return refused
    assert key.startswith(event.key + "|")
    assert MIN_NS <= mark <= MAX_NS
    return event


def check(outcome: Outcome, event_type: str, key: str) -> None:
    """An event must match its schema and serialize (and say so: `verified`, which spares it
    the publisher's check); a refusal must have a reason code and a dead letter that matches
    its schema and serializes."""
    if isinstance(outcome, BadRecord):
        assert REASON.fullmatch(outcome.reason), outcome.reason
        letter = dead_letter(
            source="test",
            raw=outcome.raw or b"",
            reason=outcome.reason,
            detail=outcome.detail,
            key=key,
            event_type=event_type,
        )
        _valid(letter)
        return
    assert outcome.type == event_type
    assert outcome.verified  # the publisher trusts it without checking: this proves it may
    _valid(outcome)


def _valid(event: Event) -> None:
    doc = orjson.loads(event.to_json())  # it serializes (orjson refuses ints past 64 bits)
    problem = validation.first_error(event.type, event.version, doc)
    assert problem is None, problem
    assert event.key
    assert event.key.encode()


# -- generated input ---------------------------------------------------------------------------

PROPERTY = settings(
    max_examples=10_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Compact on purpose: 10,000 examples per parser must stay fast, so values are flat (one
# level of nesting reaches every branch of the parsers) and strings short.
small_text = st.text(max_size=6)
scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | small_text
)
json_values = (
    scalars | st.lists(scalars, max_size=2) | st.dictionaries(small_text, scalars, max_size=2)
)
# values that sit on the edges of the rules (any JSON value)
edges: st.SearchStrategy[Any] = st.sampled_from(
    [
        None,
        True,
        False,
        0,
        -1,
        1,
        0.0,
        -0.0,
        0.5,
        7.0,
        1e20,
        1e300,
        -1e300,
        2**63 - 1,
        2**63,
        2**64,
        -(2**63),
        -(2**63) - 1,
        MIN_MS - 1,
        MIN_MS,
        MAX_MS,
        MAX_MS + 1,
        1_677_657_601,
        1_677_657_601_000,
        1_677_657_601_000.0,
        1_677_657_601_000.5,
        1_677_657_601_000_000,
        "",
        "0",
        "1677657601000",
        "NaN",
        "2023-03-01",
        "2023-02-30",
        "0001-01-01",
        "9999-12-31",
        "2150-01-01",
        "2023-03-01T08:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "9999-12-31T23:59:59-23:59",
        "vnfa-btca-15-d",
        "vnfa-btca-15-h",
        "vnfa-btca-15-r",
        "٣",
        "\x00",
        "💥",
        [],
        {},
    ]
)
edge_or_json = edges | json_values


mutated_fields = st.lists(st.sampled_from(NAV_FIELDS), max_size=3, unique=True)
quarter = st.integers(0, 3)


@st.composite
def near_valid(draw: st.DrawFn, base: dict[str, Any]) -> dict[str, Any]:
    """`base` with up to three fields dropped or replaced, and maybe an unknown one added."""
    record = dict(base)
    for name in draw(mutated_fields):
        if draw(st.booleans()):
            record.pop(name, None)
        else:
            record[name] = draw(edge_or_json)
    if draw(quarter) == 0:
        record[draw(small_text)] = draw(json_values)
    return record


near_valid_by_symbol = {str(b["symbol"]): near_valid(b) for b in (DAILY, HOURLY, REALTIME)}


def encode(value: Any, ascii_only: bool) -> bytes:
    """JSON text as an upstream could write it: big integers kept, NaN as a bare token."""
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


symbols = st.sampled_from(sorted(near_valid_by_symbol))
kinds = st.integers(0, 4)
raw_bytes = st.binary(max_size=40)
free_text = st.text(max_size=24)
json_or_float = json_values | st.floats()
ws_batches = {
    symbol: st.lists(record | json_values, max_size=3)
    for symbol, record in near_valid_by_symbol.items()
}
rest_pages = {
    symbol: st.lists(record | edges, max_size=3) for symbol, record in near_valid_by_symbol.items()
}
results = st.just("success") | edges
messages = st.just("Success") | small_text
envelope_keys = st.lists(st.sampled_from(["data", "message", "params", "result"]), max_size=2)


@st.composite
def ws_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    symbol = draw(symbols)
    kind = draw(kinds)
    if kind == 0:
        return symbol, draw(raw_bytes)
    if kind == 1:
        return symbol, draw(free_text).encode("utf-8", "surrogatepass")
    value: Any
    if kind == 2:
        value = draw(json_or_float)
    elif kind == 3:
        value = draw(near_valid_by_symbol[symbol])
    else:
        value = draw(ws_batches[symbol])
    return symbol, encode(value, draw(st.booleans()))


@st.composite
def rest_inputs(draw: st.DrawFn) -> tuple[str, bytes]:
    symbol = draw(symbols)
    kind = draw(kinds)
    if kind == 0:
        return symbol, draw(raw_bytes)
    if kind == 1:
        return symbol, encode(draw(json_values), ascii_only=True)
    body: dict[str, Any] = {
        "result": draw(results),
        "message": draw(messages),
        "data": draw(json_values) if kind == 2 else draw(rest_pages[symbol]),
        "params": {"symbol": symbol},
    }
    for name in draw(envelope_keys):
        body.pop(name, None)
    return symbol, encode(body, draw(st.booleans()))


# uids: valid RFC 3339 (offsets and precisions as Kaiko could write them), RFC-3339-shaped
# with out-of-range parts, and free text
uid_seconds = st.integers(MIN_NS // 10**9 - 86_400, MAX_NS // 10**9 + 86_400)
uid_fractions = st.sampled_from(["", ".5", ".123456789", ".1234567891234", "."])
uid_offsets = st.sampled_from(["Z", "z", "+00:00", "-05:30", "+14:00", "+24:00", "-00:60", ""])
uid_years = st.sampled_from([0, 1, 1677, 1678, 1970, 2024, 2261, 2262, 9999])
uid_parts = st.integers(0, 62**5 - 1)  # month, day, hour, minute, second: 0..61 each
uid_odd = st.sampled_from(["", "2024-08-09", "1723211239", "2024-08-09 13:47:19Z"])
uid_text = st.text(max_size=16)


@st.composite
def uids(draw: st.DrawFn) -> str:
    kind = draw(quarter)
    if kind == 0:
        seconds = draw(uid_seconds)
        day, second = divmod(seconds, 86_400)
        moment = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(days=day, seconds=second)
        return moment.strftime("%Y-%m-%dT%H:%M:%S") + draw(uid_fractions) + draw(uid_offsets)
    if kind == 1:
        year, packed = draw(uid_years), draw(uid_parts)
        month, day, hour, minute, second = ((packed // 62**i) % 62 for i in range(5))
        return (
            f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
            + draw(uid_fractions)
            + draw(uid_offsets)
        )
    if kind == 2:
        return draw(uid_odd)
    return draw(uid_text)


names = st.sampled_from(["cbse", "binc", "spot", "btc-usd", "1s", "1m", "*", ""]) | small_text
prices = st.floats() | st.sampled_from([0.0, -0.0, 1e308, -1e308, 5e-324, math.inf, math.nan])
int64 = st.integers(-(2**63), 2**63 - 1)
int32 = st.integers(-(2**31), 2**31 - 1)
ts_events = st.one_of(
    st.none(),
    st.tuples(st.integers(-(2**34), 2**34), st.integers(-1, 1_000_000_000)),
    st.tuples(int64, int32),
    st.sampled_from(
        [
            (0, 0),
            (MIN_NS // 10**9, 0),
            (MIN_NS // 10**9 + 1, 0),
            (MAX_NS // 10**9, MAX_NS % 10**9),
            (MAX_NS // 10**9, MAX_NS % 10**9 + 1),
        ]
    ),
)


# Each example changes up to three fields of the docs' sample, to anything of the field's type.
VWAP_FIELDS = {
    **{name: names for name in ("exchange", "class", "code", "aggregate", "sequence_id")},
    "uid": uids(),
    "price": prices,
    "ts_event": ts_events,
}
vwap_mutations = st.lists(st.sampled_from(sorted(VWAP_FIELDS)), max_size=3, unique=True)


@st.composite
def vwap_inputs(draw: st.DrawFn) -> Any:
    fields = dict(DOC_VWAP)
    ts: tuple[int, int] | None = DOC_TS_EVENT
    for name in draw(vwap_mutations):
        if name == "ts_event":
            ts = draw(ts_events)
        else:
            fields[name] = draw(VWAP_FIELDS[name])
    msg = vwap_message(fields, ts)
    if ts is None and draw(st.booleans()):
        msg.ts_event.SetInParent()  # present, all zero
    return msg


# -- properties ------------------------------------------------------------------------------


@PROPERTY
@given(ws_inputs())
def test_websocket_messages_become_events_or_refusals(case: tuple[str, bytes]) -> None:
    symbol, message = case
    for outcome in ws_outcomes(message, symbol):
        check(outcome, NAV_TICK, symbol)
        if isinstance(outcome, Event):
            assert outcome.key == symbol


@PROPERTY
@given(rest_inputs())
def test_rest_bodies_become_events_or_refusals(case: tuple[str, bytes]) -> None:
    symbol, body = case
    event_type = SETTLEMENT if frequency_of(symbol) == "daily" else NAV_TICK
    for outcome in rest_outcomes(body, symbol):
        check(outcome, event_type, symbol)


@PROPERTY
@given(vwap_inputs())
def test_vwap_responses_become_events_or_refusals(msg: Any) -> None:
    outcome = vwap_outcome(msg)
    check(outcome, VWAP_TICK, "kaiko.vwap")
    if isinstance(outcome, Event):
        assert outcome.data["price"] == msg.price
        assert math.isfinite(outcome.data["price"])


# -- the hand-written table -----------------------------------------------------------------

WS_CASES = {
    f"{base['symbol']}: {case.name}": (base["symbol"], case)
    for base in (REALTIME, HOURLY, DAILY)
    for case in ws_cases(base)
}
REST_CASES = {
    f"{base['symbol']}: {case.name}": (base["symbol"], case)
    for base in (DAILY, HOURLY, REALTIME)
    for case in body_cases(base)
} | {
    f"{base['symbol']}: {case.name}": (base["symbol"], case)
    for base in (HOURLY, REALTIME)
    for case in rest_nav_body_cases(base)
}
DAILY_CASES = {case.name: case for case in daily_record_cases(DAILY)}
VWAP_CASES = {case.name: case for case in vwap_cases()}


def test_the_table_is_large_and_names_are_unique() -> None:
    """At least 50 distinct hand-written cases (counted once per input, not per symbol)."""
    distinct = (
        len(ws_cases(REALTIME))
        + len(body_cases(DAILY))
        + len(daily_record_cases(DAILY))
        + len(vwap_cases())
    )
    assert distinct >= 50
    for cases in (ws_cases(REALTIME), body_cases(DAILY), daily_record_cases(DAILY), vwap_cases()):
        assert len({c.name for c in cases}) == len(cases)


def test_the_samples_are_valid() -> None:
    """Each case breaks a valid record: the unbroken ones must pass, or the table is moot."""
    for base in (REALTIME, HOURLY, DAILY):
        [event] = ws_outcomes(dumps(base), str(base["symbol"]))
        assert isinstance(event, Event)
    [settled] = rest_outcomes(envelope([DAILY], str(DAILY["symbol"])), str(DAILY["symbol"]))
    assert isinstance(settled, Event)
    assert isinstance(vwap_outcome(vwap_message(DOC_VWAP, DOC_TS_EVENT)), Event)


@pytest.mark.parametrize("name", sorted(WS_CASES))
def test_websocket_case(name: str) -> None:
    symbol, case = WS_CASES[name]
    assert isinstance(case, WsCase)
    [outcome] = ws_outcomes(case.message, symbol)
    assert isinstance(outcome, BadRecord), f"accepted: {outcome}"
    assert outcome.reason == case.reason, outcome
    check(outcome, NAV_TICK, symbol)


@pytest.mark.parametrize("name", sorted(REST_CASES))
def test_rest_body_case(name: str) -> None:
    symbol, case = REST_CASES[name]
    assert isinstance(case, BodyCase)
    [outcome] = rest_outcomes(case.body, symbol)
    assert isinstance(outcome, BadRecord), f"accepted: {outcome}"
    assert outcome.reason == case.reason, outcome
    check(outcome, SETTLEMENT if symbol.endswith("-d") else NAV_TICK, symbol)


@pytest.mark.parametrize("name", sorted(DAILY_CASES))
def test_daily_record_case(name: str) -> None:
    """A bad record in a good daily body is refused alone; the good one beside it settles."""
    case = DAILY_CASES[name]
    assert isinstance(case, RecordCase)
    symbol = str(DAILY["symbol"])
    outcomes = rest_outcomes(envelope([case.record, DAILY], symbol), symbol)
    refused = [o for o in outcomes if isinstance(o, BadRecord)]
    settled = [o for o in outcomes if isinstance(o, Event)]
    assert [r.reason for r in refused] == [case.reason], refused
    assert [e.data["date"] for e in settled] == [DAILY["date"]]
    check(refused[0], SETTLEMENT, symbol)


@pytest.mark.parametrize("name", sorted(VWAP_CASES))
def test_vwap_case(name: str) -> None:
    case = VWAP_CASES[name]
    assert isinstance(case, VwapCase)
    outcome = vwap_outcome(case.message)
    assert isinstance(outcome, BadRecord), f"accepted: {outcome}"
    assert outcome.reason == case.reason, outcome
    check(outcome, VWAP_TICK, "kaiko.vwap")


def test_same_timestamp_records_are_all_kept() -> None:
    """Two records with one timestamp in a page are both handed on (the client used to keep
    one of them, at random since page order is random), and unmappable timestamps go to
    the caller to be refused instead of being dropped as out of range."""
    a = {**REALTIME, "value": 1.0}
    b = {**REALTIME, "value": 2.0}
    seconds = {**REALTIME, "timestamp": REALTIME["timestamp"] // 1000}
    later = {**REALTIME, "timestamp": REALTIME["timestamp"] + 1}
    ts = REALTIME["timestamp"]
    timed, unmappable, outside = split_page([later, b, seconds, a], ts, ts + 1)
    assert timed == [b, a]
    assert unmappable == [seconds]
    assert outside == 1
    assert REST_SOURCE == "vinter.rest"


# -- end to end: the bridge as a process, real broker, simulators over real sockets ------------
