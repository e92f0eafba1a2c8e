"""Where `kaiko-bridge replay` writes what it reads: lines on a stream (each value as it is on
Kafka, a kcat-like template, or JSON), or another topic through an idempotent producer."""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import Callable, Sequence
from typing import IO, Any

import orjson
from aiokafka.errors import KafkaError

from bridge.config import KafkaSettings
from bridge.consumer import KafkaRecord
from bridge.errors import BridgeError, PublishError
from bridge.kafka import new_producer
from bridge.tasks import observed

FORMAT_HELP = """\
--format json: one JSON object a line, with topic, partition, offset, timestamp (Unix ms),
key, headers and value (the value as JSON when it is JSON, else as text, or base64).
--format TEMPLATE, as kcat's -f: %t topic, %p partition, %o offset, %T timestamp (Unix ms),
%k key, %K key length, %s value, %S value length, %h headers (name=value,...), %% a percent
sign; \\n, \\t and \\\\ are a newline, a tab and a backslash. Without --format each value is
written as it is on Kafka, one a line (JSON Lines)."""

_PLACEHOLDER = re.compile(rb"%[tpoTkKsSh%]|\\[nt\\]")
_ESCAPES = {b"\\n": b"\n", b"\\t": b"\t", b"\\\\": b"\\"}
Piece = Callable[[KafkaRecord], bytes]


def _text(value: bytes) -> Any:
    """A value for JSON output: its JSON when it is JSON, else its text, else base64."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        pass
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(value).decode("ascii")}


_FIELDS: dict[bytes, Piece] = {
    b"%t": lambda r: r.topic.encode(),
    b"%p": lambda r: str(r.partition).encode(),
    b"%o": lambda r: str(r.offset).encode(),
    b"%T": lambda r: str(r.timestamp).encode(),
    b"%k": lambda r: r.key or b"",
    b"%K": lambda r: str(len(r.key) if r.key is not None else -1).encode(),
    b"%s": lambda r: r.value if r.value is not None else b"",
    b"%S": lambda r: str(len(r.value) if r.value is not None else -1).encode(),
    b"%h": lambda r: b",".join(name.encode() + b"=" + value for name, value in r.headers),
    b"%%": lambda r: b"%",
}


class RecordFormat:
    """How a record becomes bytes on the output stream (see `FORMAT_HELP`)."""

    def __init__(self, spec: str | None) -> None:
        self.spec = spec
        self._pieces: list[Piece] = []
        if spec is not None and spec != "json":
            template = spec.encode()
            position = 0
            for match in _PLACEHOLDER.finditer(template):
                self._pieces.append(_literal(template[position : match.start()]))
                token = match.group()
                self._pieces.append(_FIELDS.get(token) or _literal(_ESCAPES[token]))
                position = match.end()
            self._pieces.append(_literal(template[position:]))

    def render(self, record: KafkaRecord) -> bytes:
        if self.spec is None:
            return _value_line(record)
        if self.spec == "json":
            key, value = record.key, record.value
            doc = {
                "topic": record.topic,
                "partition": record.partition,
                "offset": record.offset,
                "timestamp": record.timestamp,
                "key": key.decode("utf-8", "replace") if key is not None else None,
                "headers": {name: raw.decode("utf-8", "replace") for name, raw in record.headers},
                "value": _text(value) if value is not None else None,
            }
            return orjson.dumps(doc, option=orjson.OPT_APPEND_NEWLINE)
        return b"".join(piece(record) for piece in self._pieces)


def _literal(text: bytes) -> Piece:
    return lambda _: text


def _value_line(record: KafkaRecord) -> bytes:
    value = record.value
    if value is None:
        return b"null\n"  # a tombstone: JSON null keeps one line per record
    if b"\n" in value:
        raise BridgeError(
            f"{record.topic} partition {record.partition} offset {record.offset}: the value "
            "holds a newline, which JSON Lines cannot carry byte for byte; use --to-topic, "
            "or --format json"
        )
    return value + b"\n"


class StreamSink:
    """Records as lines on a binary stream (a file or stdout)."""

    def __init__(self, stream: IO[bytes], form: RecordFormat) -> None:
        self._stream = stream
        self._form = form
        self.written = 0

    async def write(self, batch: Sequence[KafkaRecord]) -> None:
        render = self._form.render
        self._stream.write(b"".join(render(record) for record in batch))
        self.written += len(batch)

    async def close(self) -> None:
        self._stream.flush()


class TopicSink:
    """Re-publishes records with their keys and headers through an idempotent producer."""

    def __init__(self, settings: KafkaSettings, topic: str, *, keep_timestamps: bool) -> None:
        self._producer = new_producer(settings)
        self._topic = topic
        self._keep_timestamps = keep_timestamps
        self.written = 0

    async def start(self) -> None:
        try:
            await self._producer.start()
        except KafkaError as exc:
            await self._producer.stop()
            raise PublishError(f"cannot publish to {self._topic}: {exc}") from exc

    async def write(self, batch: Sequence[KafkaRecord]) -> None:
        try:
            sent = [  # observed: a later send may raise before they are awaited
                observed(
                    await self._producer.send(
                        self._topic,
                        value=record.value,
                        key=record.key,
                        headers=list(record.headers),
                        timestamp_ms=record.timestamp if self._keep_timestamps else None,
                    )
                )
                for record in batch
            ]
            await asyncio.gather(*sent)  # the batch is on Kafka before the next is read
        except KafkaError as exc:
            raise PublishError(f"publishing to {self._topic} failed: {exc}") from exc
        self.written += len(batch)

    async def close(self) -> None:
        await self._producer.stop()
