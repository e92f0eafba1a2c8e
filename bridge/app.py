"""The running service: publisher, supervised sources, checkpoints and the ops server.

Shutdown order (SIGTERM or SIGINT): stop the sources -> flush the publisher -> write a last
checkpoint -> close Kafka clients -> exit 0, within `shutdown_grace_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiokafka.errors import KafkaError

from bridge import aiokafka_internals, logs, metrics
from bridge.backoff import KAFKA_CAP_S, Backoff
from bridge.config import Settings
from bridge.errors import PublishError
from bridge.freshness import BOARD
from bridge.kafka import check_access
from bridge.loop import run_loop
from bridge.marks import KEEP_VERSIONS, MarkBook
from bridge.membership import Membership
from bridge.ops import OpsServer
from bridge.publish import Publisher
from bridge.publish.transactional import ShardPublisher
from bridge.shard_host import MarkedTopic, ShardHost, ShardTransactions, SourceFactory
from bridge.shards import ShardPlan, plan_shards
from bridge.supervisor import Source, SourceState
from bridge.tasks import cancel_and_wait

log = logging.getLogger(__name__)

KAFKA_PROBE_INTERVAL_S = 2.0
T = TypeVar("T")


class _Shutdown(Exception):  # noqa: N818 - a signal between tasks, not an error
    """Raised inside the task group to stop every sibling task."""


def secrets_of(settings: Settings) -> list[str]:
    """Every secret value in the settings, for the log redaction filter."""
    values = [
        settings.kafka.sasl_password,
        settings.vinter.token,
        settings.vinter.api_key,
        settings.kaiko.api_key,
    ]
    return [v.get_secret_value() for v in values if v is not None]


@dataclass
class Bridge:
    """Joins the group of replicas and runs the shards it is given until asked to stop."""

    settings: Settings
    ops_port: int | None = None  # overrides settings.ops.port (tests use 0)
    publisher: Publisher | None = None  # shared: dead letters and the Kafka probe
    host: ShardHost | None = None
    membership: Membership | None = None
    kafka_ok: bool = False
    started: asyncio.Event = field(default_factory=asyncio.Event)
    ops: OpsServer | None = None

    @property
    def states(self) -> list[SourceState]:
        return self.host.states if self.host is not None else []

    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready: Kafka up, in the group, and every shard held running with its sources
        connected."""
        sources = {s.name: "up" if s.connected else "down" for s in self.states}
        kafka_up = self.kafka_ok and self.publisher is not None and self.publisher.healthy
        trouble = self.publisher.dead_letter_trouble if self.publisher is not None else None
        joined = self.membership is not None and self.membership.joined
        held = sorted(self.membership.held) if self.membership is not None else []
        ok = (
            kafka_up
            and trouble is None
            and self.started.is_set()
            and joined
            and self.host is not None
            and self.host.healthy()
        )
        detail: dict[str, Any] = {"kafka": "up" if kafka_up else "down", "sources": sources}
        detail["dead_letters"] = trouble or "ok"
        detail["shards"] = {"joined": joined, "held": held}
        return ok, detail

    def _marked_topics(self) -> list[MarkedTopic]:
        from bridge.normalize import nav, vwap

        s = self.settings
        topics = s.kafka.topics
        return [
            MarkedTopic(
                "nav",
                topics.nav_ticks,
                nav.mark_of,
                lambda plan: plan.owns_nav if plan.nav_symbols else None,
                s.vinter.revisions_kept,
            ),
            MarkedTopic(
                "vwap",
                topics.vwap_ticks,
                vwap.mark_of,
                lambda plan: plan.owns_vwap if plan.vwap else None,
                KEEP_VERSIONS,
            ),
        ]

    async def _shared(self, stack: contextlib.AsyncExitStack) -> SourceFactory:
        """What every shard's sources share (the REST client, the child holding the NAV
        sockets), and the factory of one shard's sources."""
        s = self.settings
        rest: Any = None
        receiver: Any = None
        if s.vinter.symbols or s.settlement.symbols:
            from bridge.sources.vinter_rest import VinterRest

            rest = VinterRest(
                s.vinter.rest_url, s.vinter.api_key, max_body_bytes=s.vinter.max_body_bytes
            )
            stack.push_async_callback(rest.close)
        if s.vinter.symbols:
            from bridge.sources.nav_receiver import nav_worker

            # one child process holds every NAV socket of this replica
            receiver = nav_worker(max_queued_bytes=s.vinter.max_queued_bytes)
            stack.push_async_callback(receiver.close)

        def make_sources(
            plan: ShardPlan, publisher: ShardPublisher, books: dict[str, MarkBook]
        ) -> list[Source]:
            sources: list[Source] = []
            if plan.nav_symbols:
                from bridge.sources.nav_ws import NavSocketSource

                sources += [
                    NavSocketSource(
                        symbol, s.vinter, publisher, books["nav"], rest, receiver=receiver
                    )
                    for symbol in plan.nav_symbols
                ]
            if plan.vwap:
                from bridge.sources.vwap_grpc import VwapSource

                sources += [VwapSource(sub, s.kaiko, publisher, books["vwap"]) for sub in plan.vwap]
            if plan.settlement_symbols:
                from bridge.sources.settlement import SettlementPoller, poller_name

                sources.append(
                    SettlementPoller(
                        s.settlement.model_copy(update={"symbols": plan.settlement_symbols}),
                        s.kafka,
                        rest,
                        lookback_days=s.settlement.lookback_days,
                        sink=ShardTransactions(s, publisher),
                        name=poller_name(plan.shard),
                    )
                )
            return sources

        return make_sources

    async def _connect(self, publisher: Publisher, stop: asyncio.Event) -> bool:
        """Start the publisher, waiting for Kafka as long as it takes (readiness says 503
        meanwhile); False if asked to stop first. A broker that rejects the credentials,
        the SASL mechanism or the CA raises ConfigError at once: waiting cannot fix those."""
        backoff = Backoff(cap=KAFKA_CAP_S)
        while not stop.is_set():
            try:
                await publisher.start()
            except (KafkaError, OSError, TimeoutError) as exc:
                await check_access(self.settings.kafka)
                delay = backoff.next_delay()
                log.warning(
                    "Kafka at %s is not reachable (%s); retrying in %.1fs",
                    self.settings.kafka.bootstrap_servers,
                    type(exc).__name__,
                    delay,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            else:
                self.kafka_ok = True
                return True
        return False

    async def _probe_kafka(self, publisher: Publisher) -> None:
        while True:
            self.kafka_ok = await publisher.probe(timeout=KAFKA_PROBE_INTERVAL_S)
            await asyncio.sleep(KAFKA_PROBE_INTERVAL_S)

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set; raises PublishError if Kafka is lost for good, and
        DependencyError at once if the installed aiokafka lacks a name the bridge uses."""
        await aiokafka_internals.check()
        s = self.settings
        self.ops = OpsServer(
            s.ops.host, s.ops.port if self.ops_port is None else self.ops_port, self.ready
        )
        metrics.READY.set_function(lambda: float(self.ready()[0]))
        metrics.KAFKA_UP.set_function(lambda: float(self.ready()[1]["kafka"] == "up"))
        await self.ops.start()
        try:
            async with contextlib.AsyncExitStack() as stack:
                publisher = Publisher(
                    s.kafka, min_retention_ms=int(s.vinter.backfill_max_age_s * 1000)
                )
                self.publisher = publisher
                if not await self._connect(publisher, stop):
                    return
                stack.push_async_callback(publisher.close, s.shutdown_grace_s / 2)
                stack.push_async_callback(publisher.flush_quietly, s.shutdown_grace_s / 2)
                make_sources = await self._shared(stack)
                plans = plan_shards(s)
                track_subscriptions(s, plans)
                BOARD.watch(lambda: {state.name: state for state in self.states})
                self.host = ShardHost(s, publisher, plans, self._marked_topics(), make_sources)
                self.membership = Membership(s, take=self.host.take, release=self.host.release)
                log.info(
                    "bridge started: %d subscriptions in %d shards",
                    sum(
                        len(p.nav_symbols) + len(p.vwap) + len(p.settlement_symbols) for p in plans
                    ),
                    len(plans),
                )
                self.started.set()
                await self._supervise(publisher, self.host, self.membership, stop)
        finally:
            await self.ops.close()
            if self.publisher is not None:
                host = self.host
                log.info(
                    "stopped: %d events acknowledged by Kafka, %d dead letters, %d lost",
                    (host.published if host else 0) + self.publisher.published,
                    self.publisher.dead_lettered,
                    (host.lost if host else 0) + self.publisher.lost,
                )

    async def _supervise(
        self, publisher: Publisher, host: ShardHost, membership: Membership, stop: asyncio.Event
    ) -> None:
        async def until_stopped() -> None:
            await stop.wait()
            raise _Shutdown

        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(membership.run(), name="membership")
                group.create_task(host.checkpoint_forever(), name="checkpointer")
                group.create_task(host.failed(), name="shard-failure")
                group.create_task(self._probe_kafka(publisher), name="kafka-probe")
                group.create_task(until_stopped(), name="stop")
        except* _Shutdown:
            log.info("stopped: shards released, flushing Kafka")


def track_subscriptions(settings: Settings, plans: Sequence[ShardPlan]) -> None:
    """A row on the freshness board for every configured subscription, held here or not."""
    for plan in plans:
        if plan.nav_symbols:
            from bridge.sources import nav_ws

            for symbol in plan.nav_symbols:
                nav_ws.freshness_row(symbol, settings.vinter)
        if plan.vwap:
            from bridge.sources import vwap_grpc

            for sub in plan.vwap:
                vwap_grpc.freshness_row(sub, settings.kaiko)
        if plan.settlement_symbols:
            from bridge.sources import settlement

            for symbol in plan.settlement_symbols:
                settlement.freshness_row(symbol, settlement.poller_name(plan.shard))


async def _unless_stopped(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T | None:
    """`work`'s result, or None if `stop` is set first (then `work` is cancelled): start-up
    steps that wait on Kafka must not hold up a SIGTERM."""
    task = asyncio.ensure_future(work)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait((task, stopped), return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopped.cancel()
        if not task.done():
            await cancel_and_wait(task)
    return None if task.cancelled() else task.result()


def _install_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


async def serve(settings: Settings) -> int:
    stop = asyncio.Event()
    _install_signals(stop)
    bridge = Bridge(settings)
    started = time.monotonic()
    failure: BaseException | None = None
    try:
        await bridge.run(stop)
    except* PublishError as group:
        failure = group.exceptions[0]
    if failure is not None:
        log.critical("Kafka is unusable, exiting: %s", failure)
        return 1
    log.info("stopped cleanly in %.1fs", time.monotonic() - started)
    return 0


def run_service(settings: Settings) -> int:
    """`kaiko-bridge run`: the production entry point."""
    logs.configure(settings.log_level, settings.log_format, secrets_of(settings))
    return run_loop(serve(settings))
