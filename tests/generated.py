"""Generated upstream input for the three parsers, and what each parser makes of one input.

The property tests (`tests/unit/test_decoders.py`) check every outcome; the dead-letter round
trip (`tests/integration/test_generated_rejects.py`) sends every refusal to Kafka. Both draw
from the same strategies and decode the way the sources do, and `run` counts what executed.

Inputs reach 1 MB (`MAX_INPUT`): past `kafka.max_record_bytes` (`RECORD_LIMIT`, the one byte
bound below 1 MB), so events too large to publish are made too. The other bounds sit above
1 MB (WebSocket and gRPC messages: 4 MB, REST bodies: 32 MB) and are enforced before decoding.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.config import KafkaSettings
from bridge.errors import BadRecord
from bridge.events import Event
from bridge.normalize.nav import MAX_MS, MIN_MS, decode_message, decode_records, frequency_of
from bridge.normalize.settlement_book import SettlementBook
from bridge.normalize.vwap import MAX_NS, MIN_NS, decode_response
from bridge.sources.vinter_rest import parse_body, split_page
from tests.malformed import DOC_TS_EVENT, DOC_VWAP, vwap_message
from tests.samples import DAILY, HOURLY, NAV_FIELDS, REALTIME

#: Inputs each parser's property must execute (asserted on the count, not only asked for).
EXAMPLES = 10_000
MAX_INPUT = 1 << 20
#: The largest record the publisher sends; a larger event becomes a `too_large` dead letter.
RECORD_LIMIT = KafkaSettings().max_record_bytes
#: About one input in this many is large (up to `MAX_INPUT`); the rest stay small and fast.
LARGE_ONE_IN = 50

Outcome = Event | BadRecord
T = TypeVar("T")

PROPERTY = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# -- counting what ran ---------------------------------------------------------------------


@dataclass
class Tally:
    """What one parser's property executed: inputs, inputs refused in whole or in part,
    refusals by reason (`too_large`: events the publisher refuses), the largest input."""

    parser: str
    inputs: int = 0
    refused: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    largest: int = 0

    def count(self, size: int, reasons: list[str]) -> None:
        self.inputs += 1
        self.refused += bool(reasons)
        self.reasons.update(reasons)
        self.largest = max(self.largest, size)

    def __str__(self) -> str:
        reasons = ", ".join(f"{name} {n}" for name, n in sorted(self.reasons.items()))
        return (
            f"{self.parser}: {self.inputs} inputs executed, {self.refused} refused "
            f"({sum(self.reasons.values())} refusals: {reasons}), largest {self.largest} bytes"
        )


def run(strategy: st.SearchStrategy[T], each: Callable[[T], None]) -> None:
    """Run `each` on up to `EXAMPLES` generated inputs. Hypothesis treats that number as a
    ceiling, so `each` counts what it executed and the caller asserts the count."""
    PROPERTY(given(strategy)(each))()


# -- what each decoder makes of one input: the functions the sources run --------------------


def ws_outcomes(message: str | bytes, symbol: str) -> list[Outcome]:
    """One WebSocket message, decoded as the receiver child decodes it."""
    raw = message.encode("utf-8", "surrogatepass") if isinstance(message, str) else message
    events, refused = decode_message(raw, symbol)
    assert all(r.raw is not None for r in refused)  # each refusal holds its input
    return [*events, *refused]


def rest_page(body: bytes) -> list[Any] | BadRecord:
    """One REST body as the client reads it: its records in the order the sources get them,
    or the refusal of the whole body."""
    refused: BadRecord | None
    try:
        page = parse_body(body)
    except BadRecord as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert refused.raw == body  # the whole body goes to the dead letter
        return refused
    timed, unmappable, outside = split_page(page, MIN_MS, MAX_MS + 1)
    assert outside == 0
    assert len(timed) + len(unmappable) == len(page)  # every item goes on, none is lost
    records: list[Any] = timed + unmappable
    return records


def rest_records(records: list[Any], symbol: str) -> list[Outcome]:
    """The records of one body: NAV ticks (hourly and real-time back-fill) or a settlement
    plan (daily, over the service's record limit as it runs), re-planned to check it is
    idempotent."""
    if frequency_of(symbol) != "daily":
        ticks, bad = decode_records(records, symbol)
        assert all(r.raw is not None for r in bad)
        return [*(event for event, _ in ticks), *bad]
    book = SettlementBook(max_record_bytes=RECORD_LIMIT)
    plan = book.plan(symbol, records)
    book.apply([plan])
    again = book.plan(symbol, records)
    assert not again.events, "the same poll twice published a second revision"
    assert not again.refused, "a refused record was dead-lettered twice"
    refusals = [BadRecord(r.reason, r.detail, raw=r.raw) for r in plan.refused]
    return [*plan.events, *refusals]


def rest_outcomes(body: bytes, symbol: str) -> list[Outcome]:
    """One REST body of the symbol's endpoint: envelope, page, then its records."""
    page = rest_page(body)
    return [page] if isinstance(page, BadRecord) else rest_records(page, symbol)


def vwap_outcome(raw: bytes) -> Outcome:
    """One response as the gRPC receiver hands it on (bytes), decoded as the source does."""
    refused: BadRecord | None
    try:
        event, key, mark = decode_response(raw)
    except BadRecord as exc:
        refused = exc
    else:
        refused = None
    if refused is not None:
        assert refused.raw is not None
        if refused.reason == "undecodable":
            assert refused.raw == raw  # bytes that never parsed are kept as they came
        return refused
    assert key.startswith(event.key + "|")
    assert MIN_NS <= mark <= MAX_NS
    return event


def too_large(event: Event) -> bytes | None:
    """The event's bytes if the publisher refuses them (over `kafka.max_record_bytes`: it
    dead-letters them as `too_large`), else None."""
    value = event.to_json()
    return value if len(value) > RECORD_LIMIT else None


# -- generated input: small ----------------------------------------------------------------

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


SAMPLES = {str(b["symbol"]): b for b in (DAILY, HOURLY, REALTIME)}
near_valid_by_symbol = {symbol: near_valid(b) for symbol, b in SAMPLES.items()}


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


# -- generated input: large ----------------------------------------------------------------

# `sampled_from` draws evenly; hypothesis' bounded integers favour their ends.
large = st.sampled_from(range(LARGE_ONE_IN)).map(lambda n: n == 0)
# sizes on both sides of the record limit (an event carries about 500 bytes more than the
# record it came from), up to 1 MB, and anywhere below
edge_sizes = st.sampled_from(
    [RECORD_LIMIT - 4096, RECORD_LIMIT - 1, RECORD_LIMIT, RECORD_LIMIT + 1, MAX_INPUT]
)
sizes = edge_sizes | st.integers(0, MAX_INPUT)
byte_chunks = st.binary(min_size=1, max_size=16)
# ASCII pads keep an event about as large as its input (other text may shrink it: `\u00e9`
# in the input, two bytes in the event), so padded records land on both sides of the limit.
text_chunks = st.text(st.characters(max_codepoint=127), min_size=1, max_size=4) | st.text(
    min_size=1, max_size=4
)
nav_pads = st.sampled_from(["note", "created_at", "updated_at", "date", "symbol"])
large_kinds = st.sampled_from(["bytes", "padded", "padded", "repeated"])


def tile(chunk: bytes, size: int) -> bytes:
    """`chunk` repeated to exactly `size` bytes: a large input from a small draw."""
    return (chunk * (size // len(chunk) + 1))[:size]


def as_ws(value: bytes) -> bytes:
    return value


def as_rest(records: bytes) -> bytes:
    """A body around a JSON array of records."""
    return b'{"result":"success","message":"Success","data":' + records + b"}"


@st.composite
def large_nav(draw: st.DrawFn, symbol: str, wrap: Callable[[bytes], bytes]) -> bytes:
    """Up to 1 MB around a JSON array of records (`wrap`): random bytes, the symbol's valid
    sample with one field padded (an event that may be over the record limit), or one
    near-valid record repeated (refusals past `MAX_REFUSED_PER_INPUT` are folded)."""
    kind = draw(large_kinds)
    if kind == "bytes":
        return tile(draw(byte_chunks), draw(sizes))
    ascii_only = draw(st.booleans())
    if kind == "padded":
        size, name, chunk = draw(edge_sizes), draw(nav_pads), draw(text_chunks)
        alone = wrap is as_ws and draw(st.booleans())  # a socket message may be one record

        def padded(pad: str) -> bytes:
            record = {**SAMPLES[symbol], name: pad}
            return wrap(encode(record if alone else [record], ascii_only))

        reps = max(0, size - len(padded(""))) // (len(encode(chunk, ascii_only)) - 2)
        return padded(chunk * reps)
    item = encode(draw(near_valid_by_symbol[symbol]), ascii_only)
    count = max(1, (draw(sizes) - len(wrap(b"[]"))) // (len(item) + 1))
    return wrap(b"[" + b",".join(itertools.repeat(item, count)) + b"]")


large_ws = {symbol: large_nav(symbol, as_ws) for symbol in SAMPLES}
large_rest = {symbol: large_nav(symbol, as_rest) for symbol in SAMPLES}


# -- NAV inputs ----------------------------------------------------------------------------


@st.composite
def nav_inputs(
    draw: st.DrawFn,
    large_of: dict[str, st.SearchStrategy[bytes]],
    small: Callable[[st.DrawFn, str, int], bytes],
) -> tuple[str, bytes]:
    """(symbol, one input for it): large, random bytes, or of a `small` kind (1 to 4)."""
    symbol = draw(symbols)
    if draw(large):
        return symbol, draw(large_of[symbol])
    kind = draw(kinds)
    return symbol, draw(raw_bytes) if kind == 0 else small(draw, symbol, kind)


def ws_message(draw: st.DrawFn, symbol: str, kind: int) -> bytes:
    """Text, any JSON value, a near-valid record or a batch of records and values."""
    if kind == 1:
        return draw(free_text).encode("utf-8", "surrogatepass")
    value: Any
    if kind == 2:
        value = draw(json_or_float)
    elif kind == 3:
        value = draw(near_valid_by_symbol[symbol])
    else:
        value = draw(ws_batches[symbol])
    return encode(value, draw(st.booleans()))


def rest_body(draw: st.DrawFn, symbol: str, kind: int) -> bytes:
    """Any JSON value, or the envelope (parts missing, others off) around any `data`."""
    if kind == 1:
        return encode(draw(json_values), ascii_only=True)
    body: dict[str, Any] = {
        "result": draw(results),
        "message": draw(messages),
        "data": draw(json_values) if kind == 2 else draw(rest_pages[symbol]),
        "params": {"symbol": symbol},
    }
    for name in draw(envelope_keys):
        body.pop(name, None)
    return encode(body, draw(st.booleans()))


def ws_inputs() -> st.SearchStrategy[tuple[str, bytes]]:
    """(symbol, one message of its socket)."""
    return nav_inputs(large_ws, ws_message)


def rest_inputs() -> st.SearchStrategy[tuple[str, bytes]]:
    """(symbol, one body of its REST endpoint)."""
    return nav_inputs(large_rest, rest_body)


# -- VWAP inputs ---------------------------------------------------------------------------

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


# Each message changes up to three fields of the docs' sample, to anything of the field's type.
VWAP_FIELDS = {
    **{name: names for name in ("exchange", "class", "code", "aggregate", "sequence_id")},
    "uid": uids(),
    "price": prices,
    "ts_event": ts_events,
}
vwap_mutations = st.lists(st.sampled_from(sorted(VWAP_FIELDS)), max_size=3, unique=True)


@st.composite
def vwap_messages(draw: st.DrawFn) -> Any:
    """A well-formed response: the docs' sample with up to three fields changed."""
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


#: A field number the response does not have: parsers skip it (an unknown field).
UNKNOWN_FIELD = 1000
vwap_pads = st.sampled_from(["sequence_id", "sequence_id", "sequence_id", "code", "uid", "unknown"])


def varint(n: int) -> bytes:
    """`n` as a protobuf base-128 varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def large_vwap(draw: st.DrawFn) -> bytes:
    """Up to 1 MB: random bytes, or the docs' sample with one string field padded (an event
    that may be over the record limit) or an unknown field that parsers skip."""
    if draw(quarter) == 0:
        return tile(draw(byte_chunks), draw(sizes))
    size = draw(edge_sizes)
    msg = vwap_message(DOC_VWAP, DOC_TS_EVENT)
    room = max(0, size - msg.ByteSize() - 8)  # 8: the padded field's tag and length
    name = draw(vwap_pads)
    if name == "unknown":
        pad = tile(draw(byte_chunks), room)
        head = varint(UNKNOWN_FIELD << 3 | 2) + varint(len(pad))  # wire type 2: bytes
        return bytes(msg.SerializeToString() + head + pad)
    chunk = draw(text_chunks)
    setattr(msg, name, chunk * (room // len(chunk.encode())))
    return bytes(msg.SerializeToString())


vwap_kinds = st.sampled_from(["random", "truncated", "corrupted", "spliced", *["whole"] * 4])


@st.composite
def vwap_inputs(draw: st.DrawFn) -> bytes:
    """What a gRPC receive hands on: mostly whole responses, some random bytes, and some
    responses truncated, with a byte overwritten or with bytes spliced in."""
    kind = draw(vwap_kinds)
    if kind == "random":
        return draw(raw_bytes)
    raw = draw(large_vwap()) if draw(large) else bytes(draw(vwap_messages()).SerializeToString())
    if kind == "whole" or not raw:
        return raw
    at = draw(st.integers(0, len(raw) - 1))
    if kind == "truncated":
        return raw[:at]
    if kind == "corrupted":
        return raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1 :]
    return (raw[:at] + draw(raw_bytes) + raw[at:])[:MAX_INPUT]
