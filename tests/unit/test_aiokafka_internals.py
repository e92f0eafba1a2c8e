"""The aiokafka internals the bridge uses are checked at start: a version without one of
them stops the bridge with an error naming it, before any connection is tried."""

from __future__ import annotations

import asyncio
import re
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaConnectionError, KafkaError, ProducerFenced, UnknownError
from aiokafka.producer.message_accumulator import MessageAccumulator

from bridge import aiokafka_internals
from bridge.app import Bridge
from bridge.config import KafkaSettings, Settings
from bridge.errors import DependencyError
from bridge.publish import Publisher

REPO = Path(__file__).resolve().parents[2]


async def test_the_installed_aiokafka_has_every_name() -> None:
    await aiokafka_internals.check()


def test_the_tested_version_is_the_locked_one() -> None:
    lock = (REPO / "requirements.lock").read_text(encoding="utf-8")
    assert f"aiokafka=={aiokafka_internals.TESTED_WITH} " in lock
    assert version("aiokafka") == aiokafka_internals.TESTED_WITH


async def test_a_missing_method_is_named_with_the_version(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(AIOKafkaClient, "_wait_on_metadata")
    with pytest.raises(DependencyError) as caught:
        await aiokafka_internals.check()
    message = str(caught.value)
    assert f"aiokafka {version('aiokafka')} lacks AIOKafkaClient._wait_on_metadata" in message
    assert f"install aiokafka=={aiokafka_internals.TESTED_WITH}" in message


def _without_batch_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    """An aiokafka whose accumulator no longer keeps `_batch_ttl` (renamed, say)."""
    init = MessageAccumulator.__init__

    def renamed(self: MessageAccumulator, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self.__dict__["batch_ttl"] = self.__dict__.pop("_batch_ttl")

    monkeypatch.setattr(MessageAccumulator, "__init__", renamed)


async def test_a_missing_attribute_fails_the_publisher_before_it_connects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _without_batch_ttl(monkeypatch)
    # nothing listens on port 1: a publisher that tried to connect would fail otherwise
    publisher = Publisher(KafkaSettings(bootstrap_servers="127.0.0.1:1", request_timeout_ms=1000))
    async with asyncio.timeout(5):
        with pytest.raises(DependencyError, match=re.escape("_message_accumulator._batch_ttl")):
            await publisher.start()


async def test_the_service_stops_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    _without_batch_ttl(monkeypatch)
    settings = Settings(kafka=KafkaSettings(bootstrap_servers="127.0.0.1:1"))
    bridge = Bridge(settings, ops_port=0)
    async with asyncio.timeout(5):
        with pytest.raises(DependencyError, match="lacks"):
            await bridge.run(asyncio.Event())
    assert not bridge.started.is_set()


def _caused(exc: BaseException, cause: BaseException) -> BaseException:
    """`exc` raised `from cause`, as aiokafka's sender raises it."""
    exc.__cause__ = cause
    return exc


def test_only_an_unknown_coordinator_error_counts_as_a_failed_commit() -> None:
    """aiokafka's sender stops with `KafkaError` from the `UnknownError` the coordinator's
    UNKNOWN_SERVER_ERROR became (Kafka's answer to a commit racing a fence); nothing else."""
    delivery = "Unexpected error during batch delivery"
    assert aiokafka_internals.coordinator_failed(_caused(KafkaError(delivery), UnknownError()))
    assert not aiokafka_internals.coordinator_failed(_caused(KafkaError(delivery), OSError()))
    assert not aiokafka_internals.coordinator_failed(ProducerFenced())
    assert not aiokafka_internals.coordinator_failed(KafkaConnectionError())
    assert not aiokafka_internals.coordinator_failed(UnknownError())
    assert not aiokafka_internals.coordinator_failed(_caused(OSError(), UnknownError()))
