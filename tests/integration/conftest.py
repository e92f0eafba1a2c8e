"""Fixtures for integration tests: settings that point at the session broker, unique topics."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from bridge.config import KafkaSettings, Topics


@pytest.fixture
def kafka_settings(kafka: Any) -> KafkaSettings:
    """Kafka settings on the session broker with topics no other test uses."""
    prefix = f"t{uuid.uuid4().hex[:10]}"
    return KafkaSettings(
        bootstrap_servers=kafka.bootstrap,
        partitions=3,
        linger_ms=2,
        topics=Topics.prefixed(prefix),
    )
