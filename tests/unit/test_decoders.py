"""The decoders' proofs: every input becomes valid events or refusals with a reason.

* property tests, one per parser over inputs from `tests/generated.py`: random bytes,
  arbitrary JSON, near-valid records with fields broken, arbitrary proto field values, VWAP
  bytes that do not parse (random, truncated, corrupted), and about one input in a hundred
  large, up to 1 MB. Each input either becomes events that match their schema and serialize
  (which is what lets the publisher skip validating them: `verified`), or is refused with
  `BadRecord` and a reason code; any other exception fails the test. An event over
  `kafka.max_record_bytes` counts as refused too (`too_large`: the publisher dead-letters
  it). Every refusal's dead letter must match its schema and fit in one Kafka record.
* what is counted: each property counts the inputs it executed, the inputs refused, the
  refusals by reason and the largest input, prints that line, and asserts at least 10,000
  inputs ran, one over the record limit among them, and each refusal path was taken.
* a table of hand-written malformed cases (`tests/malformed.py`), each with its reason.

The same generated refusals reach the dead-letter topic of a real broker:
`tests/integration/test_generated_rejects.py`; the hand-written inputs end to end, through
the bridge as a process: `tests/faults/test_bad_input.py`.
"""

from __future__ import annotations

import math
import re

import orjson
import pytest
from kaikosdk.stream.aggregates_vwap_v1 import response_pb2

from bridge import validation
from bridge.errors import BadRecord
from bridge.events import NAV_TICK, SETTLEMENT, VWAP_TICK, Event, dead_letter
from bridge.normalize.nav import frequency_of
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridge.sources.vinter_rest import split_page
from tests.generated import (
    EXAMPLES,
    RECORD_LIMIT,
    Outcome,
    Tally,
    rest_inputs,
    rest_outcomes,
    run,
    too_large,
    vwap_inputs,
    vwap_outcome,
    ws_inputs,
    ws_outcomes,
)
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
from tests.samples import DAILY, HOURLY, REALTIME

REASON = re.compile(r"[a-z][a-z_]*")


def check(outcome: Outcome, event_type: str, key: str) -> str | None:
    """An event must match its schema and serialize (and say so: `verified`, which spares it
    the publisher's check); a refusal must have a reason code. Returns the reason it is
    refused for, by the decoder or by the publisher (`too_large`), else None."""
    if isinstance(outcome, BadRecord):
        assert REASON.fullmatch(outcome.reason), outcome.reason
        _writable(outcome.raw or b"", outcome.reason, outcome.detail, key, event_type)
        return outcome.reason
    assert outcome.type == event_type
    assert outcome.verified  # the publisher trusts it without checking: this proves it may
    _valid(outcome)
    value = too_large(outcome)
    if value is None:
        return None
    _writable(value, "too_large", "over the record limit", outcome.key, outcome.type)
    return "too_large"


def _writable(raw: bytes | str, reason: str, detail: str, key: str, event_type: str) -> None:
    """The dead letter the publisher would send: valid, and small enough for Kafka to take."""
    letter = dead_letter(
        source="test",
        raw=raw,
        reason=reason,
        detail=detail,
        key=key,
        event_type=event_type,
        max_bytes=RECORD_LIMIT,
    )
    assert len(_valid(letter)) <= RECORD_LIMIT


def _valid(event: Event) -> bytes:
    value = event.to_json()
    doc = orjson.loads(value)  # it serializes (orjson refuses ints past 64 bits)
    problem = validation.first_error(event.type, event.version, doc)
    assert problem is None, problem
    assert event.key
    assert event.key.encode()
    return value


def checked(outcomes: list[Outcome], event_type: str, key: str) -> list[str]:
    """`check` of each outcome, an event once per content (a large message can repeat one
    record thousands of times); the reasons of the refused ones."""
    seen: set[bytes] = set()
    reasons: list[str] = []
    for outcome in outcomes:
        if isinstance(outcome, Event):
            assert outcome.key == key
            value = outcome.to_json()
            if value in seen:
                continue
            seen.add(value)
        reason = check(outcome, event_type, key)
        if reason is not None:
            reasons.append(reason)
    return reasons


def counted(tally: Tally, *, paths: tuple[str, ...]) -> None:
    """Print what ran, then assert enough did: the inputs, one past the record limit, and
    each refusal path named."""
    print(f"\n{tally}")
    assert tally.inputs >= EXAMPLES, tally
    assert tally.largest > RECORD_LIMIT, tally
    missing = [path for path in paths if not tally.reasons[path]]
    assert not missing, f"never taken: {missing}; {tally}"


# -- properties ------------------------------------------------------------------------------


def test_websocket_messages_become_events_or_refusals() -> None:
    tally = Tally("websocket")

    def each(case: tuple[str, bytes]) -> None:
        symbol, message = case
        tally.count(len(message), checked(ws_outcomes(message, symbol), NAV_TICK, symbol))

    run(ws_inputs(), each)
    counted(tally, paths=("bad_json", "too_large", "too_many_bad_records"))


def test_rest_bodies_become_events_or_refusals() -> None:
    tally = Tally("rest")

    def each(case: tuple[str, bytes]) -> None:
        symbol, body = case
        event_type = SETTLEMENT if frequency_of(symbol) == "daily" else NAV_TICK
        tally.count(len(body), checked(rest_outcomes(body, symbol), event_type, symbol))

    run(rest_inputs(), each)
    counted(tally, paths=("bad_body", "too_large", "too_many_bad_records"))


def test_vwap_responses_become_events_or_refusals() -> None:
    tally = Tally("vwap")

    def each(raw: bytes) -> None:
        outcome = vwap_outcome(raw)
        if isinstance(outcome, Event):
            price = response_pb2.StreamAggregatesVWAPResponseV1.FromString(raw).price
            assert outcome.data["price"] == price
            assert math.isfinite(price)
        reason = check(outcome, VWAP_TICK, "kaiko.vwap")
        tally.count(len(raw), [] if reason is None else [reason])

    run(vwap_inputs(), each)
    counted(tally, paths=("undecodable", "bad_field", "missing_field", "too_large"))


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
    assert isinstance(vwap_outcome(vwap_message(DOC_VWAP, DOC_TS_EVENT).SerializeToString()), Event)


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
    outcome = vwap_outcome(case.message.SerializeToString())
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
