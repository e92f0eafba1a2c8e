"""Kaiko VWAP over gRPC: one `Subscribe` stream per subscription, onto Kafka as events.

A session is one stream, received in a worker child of its own (`vwap_receiver`) and decoded
here; duplicates are dropped by interval mark, and a `bridge.gap` event marks each reconnect,
since VWAP has no replay. docs/design.md ("VWAP over gRPC") says why each choice was made.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from kaikosdk.core import instrument_criteria_pb2
from kaikosdk.stream.aggregates_vwap_v1 import request_pb2

from bridge import metrics
from bridge.config import KaikoSettings, VwapSubscription
from bridge.errors import AuthError, BadRecord, ConfigError, UpstreamError
from bridge.events import Event
from bridge.freshness import BOARD, Row
from bridge.marks import MarkBook
from bridge.normalize.vwap import aggregate_seconds, decode_response
from bridge.sink.vwap import VwapSink
from bridge.sources.vwap_receiver import Job, Option, Status, vwap_worker
from bridge.sources.worker import Channel, Ended, Worker
from bridge.supervisor import Progress

if TYPE_CHECKING:
    from bridge.publish import EventSink  # the sink's: this module sends nothing itself

log = logging.getLogger(__name__)

#: Client keepalive within what gRPC servers accept by default. Servers (grpc-core, grpc-go)
#: count a ping as abusive when it comes less than 5 minutes after the previous one with no
#: data sent in between, and close the connection after the third (`too_many_pings`). Data
#: resets that count, so a ping a minute is safe on a stream that delivers at least every
#: half minute; slower aggregates get a ping every 5.5 minutes. No ping without a call.
KEEPALIVE_FAST_MS = 60_000
KEEPALIVE_SLOW_MS = 330_000
#:
#: Flow control: a fixed 1 MiB receive window instead of BDP probing. The probe pings on
#: every burst of reads; at thousands of small messages a second it doubled the CPU of
#: gRPC's transport threads (measured with bench/vwap.py). 1 MiB in flight covers 10 MB/s
#: at 100 ms round trip, far above what one VWAP stream carries.
CHANNEL_OPTIONS: Final[tuple[Option, ...]] = (
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.bdp_probe", 0),
    ("grpc.http2.lookahead_bytes", 1 << 20),
    ("grpc.primary_user_agent", "kaiko-bridge"),
)


def channel_options(aggregate: str) -> tuple[Option, ...]:
    """Channel options for a stream of this aggregate (keepalive as explained above)."""
    fast = aggregate_seconds(aggregate) <= 30
    keepalive = KEEPALIVE_FAST_MS if fast else KEEPALIVE_SLOW_MS
    return (("grpc.keepalive_time_ms", keepalive), *CHANNEL_OPTIONS)


_RETRIABLE: Final = frozenset(
    {
        "UNAVAILABLE",
        "INTERNAL",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "DEADLINE_EXCEEDED",
        "UNKNOWN",
        "CANCELLED",
    }
)
_REFUSED: Final = {
    "UNAUTHENTICATED": ("kaiko.api_key", "the gateway refused the API key"),
    "PERMISSION_DENIED": ("kaiko.api_key", "the API key is not entitled to this stream"),
    "INVALID_ARGUMENT": ("kaiko.subscriptions", "the gateway refused the subscription request"),
}


def subscribe_request(sub: VwapSubscription) -> Any:
    """The `Subscribe` request (a StreamAggregatesVWAPRequestV1) for one subscription."""
    return request_pb2.StreamAggregatesVWAPRequestV1(
        aggregate=sub.aggregate,
        instrument_criteria=instrument_criteria_pb2.InstrumentCriteria(
            exchange=sub.exchange, instrument_class=sub.instrument_class, code=sub.code
        ),
    )


def source_name(sub: VwapSubscription) -> str:
    return f"kaiko.vwap:{sub.exchange}:{sub.instrument_class}:{sub.code}:{sub.aggregate}"


def stale_after_s(sub: VwapSubscription, settings: KaikoSettings) -> float:
    """Silence that ends a session: an instrument delivers once per interval, so never
    less than two of them."""
    return max(settings.stale_after_s, 2.0 * aggregate_seconds(sub.aggregate))


def freshness_row(sub: VwapSubscription, settings: KaikoSettings) -> Row:
    """The subscription's row on the freshness board."""
    name = source_name(sub)
    subscription = name.removeprefix("kaiko.vwap:")
    return BOARD.row("vwap", subscription, source=name, stale_after_s=stale_after_s(sub, settings))


class VwapSource:
    """One `aggregates_vwap_v1` subscription (wildcards allowed) as a supervised source.

    `book` is the MarkBook of the VWAP topic, shared by every VWAP source and recovered
    from Kafka before the sources are built.
    """

    def __init__(
        self,
        subscription: VwapSubscription,
        settings: KaikoSettings,
        publisher: EventSink,
        book: MarkBook,
        *,
        options: tuple[Option, ...] | None = None,
    ) -> None:
        if settings.api_key is None or not settings.api_key.get_secret_value():
            raise ConfigError("kaiko.api_key", "required for Kaiko VWAP subscriptions")
        sub = subscription
        self.subscription = sub
        self.name = source_name(sub)
        self._settings = settings
        self._sink = VwapSink(self.name, publisher, book, freshness_row(sub, settings))
        self._options = (
            *(options if options is not None else channel_options(sub.aggregate)),
            ("grpc.max_receive_message_length", settings.max_message_bytes),
        )
        self.stale_after_s = stale_after_s(sub, settings)
        root_certificates: bytes | None = None
        if settings.ca_file is not None:
            try:
                root_certificates = settings.ca_file.read_bytes()
            except OSError as exc:
                raise ConfigError("kaiko.ca_file", f"cannot read: {exc.strerror}") from None
        self._spec = Job(
            target=settings.target,
            api_key=settings.api_key.get_secret_value(),
            root_certificates=root_certificates,
            request=subscribe_request(sub).SerializeToString(),
            options=self._options,
        ).to_spec()
        self._received = metrics.RECEIVED.labels(self.name)
        self.sessions = 0
        self.received = 0

    def __repr__(self) -> str:
        return f"VwapSource({self.name!r}, target={self._settings.target!r})"

    @property
    def duplicates(self) -> int:
        return self._sink.duplicates

    @property
    def gaps(self) -> int:
        return self._sink.gaps

    @property
    def bad_records(self) -> int:
        return self._sink.bad_records

    # -- one session -----------------------------------------------------------------------

    async def session(self, progress: Progress) -> None:
        """Subscribe, publish until the stream ends or fails; always stops the receiver."""
        self.sessions += 1
        worker = vwap_worker()
        try:
            stream = await self._open(worker)
            try:
                status = await self._watched(stream, progress)
            finally:
                stream.close()
        finally:
            await worker.close()  # the child is gone when the session is
        if status.code != "OK":
            if status.code == "RESOURCE_EXHAUSTED" and "larger than max" in status.details:
                await self._too_large(status.details)
            raise self._translate(status)

    async def _open(self, worker: Worker) -> Channel:
        try:
            return await worker.open(self._spec)
        except Ended as ended:  # the child died before it took the stream
            reason = ended.reason or "the gRPC receiver failed"
        raise UpstreamError(self.name, reason)  # outside the handler: no __context__

    async def _too_large(self, details: str) -> None:
        """gRPC ended the call on a message over `kaiko.max_message_bytes`."""
        limit = self._settings.max_message_bytes
        detail = (
            f"a gRPC message over kaiko.max_message_bytes ({limit}): {details[:200]}; the "
            "stream is subscribed again (VWAP has no replay: a bridge.gap event follows)"
        )
        log.warning("%s: %s", self.name, detail)
        metrics.TOO_LARGE.labels(self.name).inc()
        await self._sink.dead_letter(b"", BadRecord("too_large", detail))

    async def _watched(self, stream: Channel, progress: Progress) -> Status:
        """Read the stream and publish, under the stale-stream watchdog; how it ended."""
        stale = self.stale_after_s
        try:
            async with asyncio.timeout(stale) as deadline:
                watch = _Watchdog(deadline, stale, self._count_received(progress))
                try:
                    return await self._stream(stream, progress, watch)
                finally:
                    watch.stop()
        except TimeoutError:
            if not deadline.expired():
                raise
            raise UpstreamError(self.name, f"stream stalled: no message for {stale:g}s") from None

    def _count_received(self, progress: Progress) -> Callable[[int], None]:
        def count(n: int) -> None:
            self.received += n
            self._received.inc(n)
            progress.delivered(n)

        return count

    async def _stream(self, stream: Channel, progress: Progress, watch: _Watchdog) -> Status:
        # The hot loop: locals for everything it calls; per message, only the event is new.
        decode = decode_response
        sink = self._sink
        sink.session()
        take = sink.take
        read = stream.read
        while True:
            try:
                batch = await read()
            except Ended as ended:
                if ended.report is None:  # the child died: raised outside the handler
                    error = UpstreamError(self.name, ended.reason)
                    break
                return Status(**ended.report)
            if not progress.connected:
                progress.up()
            decoded: list[tuple[Event, str, int, float] | BadRecord] = []
            for raw, received_at in batch:
                if not isinstance(raw, bytes):  # a refusal made in the child
                    decoded.append(raw)
                    continue
                try:
                    event, key, mark = decode(raw)
                except BadRecord as exc:
                    decoded.append(exc)
                    continue
                decoded.append((event, key, mark, received_at))
            watch.received += len(batch)
            watch.busy = True  # waiting on Kafka is not a stalled stream
            await take(decoded)
            watch.busy = False
        raise error

    # -- errors ----------------------------------------------------------------------------

    def _translate(self, status: Status) -> UpstreamError:
        """A gRPC status as the bridge's error: retriable, or refused with the setting."""
        details = self._redact(status.details)
        refused = _REFUSED.get(status.code)
        if refused is not None:
            setting, what = refused
            return AuthError(
                self.name, f"{what} ({status.code}: {details or 'no details'})", setting=setting
            )
        pushback = status.pushback_ms
        retry_after = (
            max(0.0, pushback / 1000)
            if pushback is not None and status.code in _RETRIABLE
            else None
        )
        return UpstreamError(
            self.name, f"stream failed with {status.code}: {details}", retry_after=retry_after
        )

    def _redact(self, text: str) -> str:
        secret = self._settings.api_key
        key = secret.get_secret_value() if secret is not None else ""
        return text.replace(key, "**********") if key else text


class _Watchdog:
    """Expires the session's deadline once the stream is silent for `stale` seconds.

    Cheaper than re-arming a timer per message: every `period` it pushes the deadline out
    if the stream moved (or was waiting on Kafka) since its last look, and hands the count
    of messages read to `count` (metrics, progress) in one go.
    """

    __slots__ = (
        "_count",
        "_deadline",
        "_handle",
        "_loop",
        "_period",
        "_seen",
        "_stale",
        "busy",
        "received",
        "reported",
    )

    def __init__(self, deadline: asyncio.Timeout, stale: float, count: Callable[[int], None]):
        self._loop = asyncio.get_running_loop()
        self._deadline = deadline
        self._stale = stale
        self._period = min(stale / 4, 1.0)
        self._count = count
        self._seen = -1
        self.received = 0
        self.reported = 0
        self.busy = False
        self._handle = self._loop.call_later(self._period, self._tick)

    def _tick(self) -> None:
        self.report()
        if self.received != self._seen or self.busy:
            self._seen = self.received
            self._deadline.reschedule(self._loop.time() + self._stale)
        self._handle = self._loop.call_later(self._period, self._tick)

    def report(self) -> None:
        if self.received != self.reported:
            self._count(self.received - self.reported)
            self.reported = self.received

    def stop(self) -> None:
        self._handle.cancel()
        self.report()
