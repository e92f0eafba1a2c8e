"""The event envelope: CloudEvents 1.0 in JSON structured mode, keyed by symbol.

Pure code: building, validating and serializing an event does no I/O. Kafka headers repeat
what a consumer routes on without parsing the value: the event type and schema version.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

import orjson

from bridge import validation

SPECVERSION = "1.0"
CONTENT_TYPE = b"application/cloudevents+json"

NAV_TICK = "vinter.nav.tick"
VWAP_TICK = "kaiko.vwap.tick"
SETTLEMENT = "vinter.nav.settlement"
GAP = "bridge.gap"
DEAD_LETTER = "bridge.deadletter"

Headers = list[tuple[str, bytes]]


@dataclass(slots=True)
class Event:
    """One event, ready to validate and serialize.

    `key` is the Kafka key and the CloudEvents `subject`: the symbol, so that every event of
    one symbol lands in one partition, in order. Not frozen, though nothing changes an event
    once built: a frozen dataclass sets each field through `object.__setattr__`, which made
    building one several times slower (an event per upstream message).

    `verified` is set by a function whose every output is proven to match its schema (the
    normalizers: property-tested over generated input in `tests/unit/test_decoders.py`).
    The publisher validates the other events before sending; re-validating these cost a
    share of the NAV path's CPU (docs/performance.md) for a check that cannot fail. It is
    not a constructor argument, so a copy made with `dataclasses.replace` starts unverified.
    """

    type: str
    id: str
    source: str
    time: str
    key: str
    data: dict[str, Any]
    version: int = 1
    verified: bool = field(default=False, init=False)

    def envelope(self) -> dict[str, Any]:
        return {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "time": self.time,
            "subject": self.key,
            "datacontenttype": "application/json",
            "dataschema": validation.schema_id(self.type, self.version),
            "data": self.data,
        }

    def validation_error(self) -> str | None:
        """None if the event matches its schema, else the first violation."""
        return validation.first_error(self.type, self.version, self.envelope())

    def to_json(self) -> bytes:
        return serialize(self.envelope())

    def headers(self) -> Headers:
        return kafka_headers(self.type, self.version)


def serialize(doc: Any) -> bytes:
    """`doc` as JSON bytes of their exact size.

    orjson returns its working buffer, about 4 KiB more than the JSON it holds; an event
    kept until Kafka acknowledges it (thousands at a time) would carry that slack, so the
    JSON is copied out (docs/performance.md has what that costs and saves).
    """
    return memoryview(orjson.dumps(doc)).tobytes()


@cache
def kafka_headers(event_type: str, version: int) -> Headers:
    """Headers for every event of one type and version (built once, shared)."""
    return [
        ("content-type", CONTENT_TYPE),
        ("event-type", event_type.encode()),
        ("schema-version", str(version).encode()),
    ]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def raw_text(raw: bytes | str) -> tuple[str, str]:
    """Raw upstream input as (text, encoding): UTF-8 when it decodes, else base64."""
    if isinstance(raw, str):
        return raw, "utf-8"
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        return base64.b64encode(raw).decode("ascii"), "base64"


MAX_RAW_CHARS = 128 * 1024
"""The most of a bad input a dead letter carries. A broker takes records up to 1 MB by
default, after compression, and random bytes do not compress: 128k characters stay under it
even as JSON escapes of 6 bytes each."""
MAX_DETAIL_CHARS = 1000
#: Room a dead letter needs besides its raw input (envelope, detail, names).
DEAD_LETTER_OVERHEAD = 8192


def raw_chars_within(max_bytes: int | None) -> int:
    """The most characters of raw input a dead letter may carry to stay under `max_bytes`
    as JSON, whatever they are (an escaped character takes at most 6 bytes)."""
    if max_bytes is None:
        return MAX_RAW_CHARS
    return max(256, min(MAX_RAW_CHARS, (max_bytes - DEAD_LETTER_OVERHEAD) // 6))


def _shortened(raw: bytes | str, text: str, encoding: str, chars: int) -> tuple[str, int]:
    """The start of an over-long raw input as text, cut on a character (UTF-8) or a 3-byte
    group (base64) so that it still decodes, and how many bytes of the input it holds."""
    if encoding == "base64" and isinstance(raw, bytes):  # base64 is only chosen for bytes
        kept = raw[: chars // 4 * 3]
        return base64.b64encode(kept).decode("ascii"), len(kept)
    text = text[:chars]
    return text, len(text.encode())


def dead_letter(
    *,
    source: str,
    raw: bytes | str,
    reason: str,
    detail: str = "",
    key: str | None = None,
    event_type: str | None = None,
    max_bytes: int | None = None,
) -> Event:
    """A dead-letter event: the raw input, where it came from and why it was refused.

    Its id hashes source and the whole raw input, so the same bad input twice has the same
    id. Of a raw input longer than fits in `max_bytes` (at most `MAX_RAW_CHARS`) only the
    start is kept, and `detail` says so: the event must still fit in one Kafka record.
    """
    text, encoding = raw_text(raw)
    digest = hashlib.sha256(source.encode() + b"\0" + text.encode()).hexdigest()[:32]
    chars = raw_chars_within(max_bytes)
    if len(detail) > MAX_DETAIL_CHARS:
        detail = detail[:MAX_DETAIL_CHARS] + "..."
    if len(text) > chars:
        size = len(raw if isinstance(raw, bytes) else raw.encode())
        text, kept = _shortened(raw, text, encoding, chars)
        note = f"first {kept} of {size} bytes kept"
        detail = f"{detail} ({note})" if detail else note
    return Event(
        type=DEAD_LETTER,
        id=f"dlq:{digest}",
        source=source,
        time=utc_now(),
        key=key or source,
        data={
            "source": source,
            "reason": reason,
            "detail": detail,
            "raw": text,
            "raw_encoding": encoding,
            "key": key,
            "event_type": event_type,
            "received_at": utc_now(),
        },
    )


def origin_of(value: bytes, headers: Headers, *, default_source: str) -> tuple[str, str | None]:
    """The source and event type of a serialized event (a record Kafka cannot take is
    dead-lettered under them), from its headers and envelope when they say."""
    event_type = dict(headers).get("event-type", b"").decode() or None
    source = default_source
    if value[:1] == b"{":
        with contextlib.suppress(orjson.JSONDecodeError):
            doc = orjson.loads(value)
            if isinstance(doc, dict) and isinstance(doc.get("source"), str):
                source = doc["source"]
    return source, event_type
