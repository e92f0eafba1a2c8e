"""Shared fixtures: one real Kafka broker per test session, and unique topic names.

The ``kafka`` fixture starts a local Apache Kafka broker (see
``dev/bridgedev/localkafka.py``) the first time a test asks for it and stops it when
the session ends. Set ``BRIDGE_TEST_KAFKA=host:port`` to use a broker that is
already running instead (e.g. ``docker run -p 9092:9092 apache/kafka:4.2.0``).
The broker does not auto-create topics: create them with ``new_topic``.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol
from uuid import uuid4

import pytest

from bridge.sources.nav_receiver import nav_worker
from bridge.sources.worker import Worker
from bridgedev import localkafka


def pytest_configure(config: pytest.Config) -> None:
    """A run started in the background (`cmd &` in a script) inherits SIGINT ignored, and
    every child process would too; tests that press Ctrl-C on a child need it delivered."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """A command run in-process (`bridge.logs.configure`) puts a handler on that test's
    captured stderr; left in place, later tests' log lines go to a closed stream. pytest's
    own handlers are subclasses of `StreamHandler`, and it manages them itself."""
    root = logging.getLogger()
    before, level = set(root.handlers), root.level
    aiokafka = logging.getLogger("aiokafka")
    aiokafka_level = aiokafka.level
    yield
    for handler in root.handlers[:]:
        if type(handler) is logging.StreamHandler and handler not in before:
            root.removeHandler(handler)
    root.setLevel(level)
    aiokafka.setLevel(aiokafka_level)


class KafkaEndpoint(Protocol):
    @property
    def bootstrap(self) -> str: ...


@dataclass(frozen=True)
class ExternalKafka:
    """A broker run by someone else, named by ``BRIDGE_TEST_KAFKA``."""

    bootstrap: str


NewTopic = Callable[..., Awaitable[str]]


def unique_topic(prefix: str = "t") -> str:
    """A topic name no other test (or earlier run against the same broker) uses."""
    return f"{prefix}-{uuid4().hex[:10]}"


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaEndpoint]:
    """The session's Kafka broker; ``.bootstrap`` is its ``host:port``."""
    external = os.environ.get("BRIDGE_TEST_KAFKA", "").strip()
    if external:
        yield ExternalKafka(external)
        return
    try:
        localkafka.fetch(quiet=True)
    except localkafka.LocalKafkaError as exc:
        pytest.fail(f"cannot provide a Kafka broker: {exc}", pytrace=False)
    broker = localkafka.LocalKafka()
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def topic_prefix() -> str:
    """A fresh prefix such as ``t-3f9c0a1b2d`` for this test's topic names."""
    return unique_topic()


@pytest.fixture
def new_topic(kafka: KafkaEndpoint, topic_prefix: str) -> NewTopic:
    """Create topics on the session broker: ``name = await new_topic(partitions=1)``.

    Names are ``<topic_prefix>-<suffix or counter>``; topics are left behind
    (names never repeat), which keeps teardown fast.
    """
    from aiokafka.admin import AIOKafkaAdminClient
    from aiokafka.admin import NewTopic as AdminNewTopic

    counter = itertools.count(1)

    async def create(
        suffix: str = "",
        *,
        partitions: int = 3,
        replication: int = 1,
        config: Mapping[str, str] | None = None,
    ) -> str:
        name = f"{topic_prefix}-{suffix or next(counter)}"
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap, request_timeout_ms=15000)
        await admin.start()
        try:
            response = await admin.create_topics(
                [AdminNewTopic(name, partitions, replication, topic_configs=dict(config or {}))]
            )
        finally:
            await admin.close()
        errors = [err for err in response.topic_errors if err[1] != 0]
        if errors:
            raise RuntimeError(f"creating topic {name} failed: {errors}")
        return name

    return create


@pytest.fixture
async def nav_receiver() -> AsyncIterator[Worker]:
    """The child process that holds NAV sockets (started on the first open), stopped after."""
    async with nav_worker() as receiver:
        yield receiver
