"""Kafka connection settings and topic administration shared by every client the bridge makes."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from bridge.config import KafkaSettings

log = logging.getLogger(__name__)

TOPIC_READY_TIMEOUT_S = 30.0


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection arguments common to producers, consumers and the admin client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = ssl.create_default_context(
            cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None
        )
    if settings.security_protocol.startswith("SASL_"):
        password = settings.sasl_password
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    return kwargs


def producer_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Producer arguments: durable and idempotent, set explicitly (aiokafka defaults to
    acks=1 without idempotence)."""
    return {
        **client_kwargs(settings),
        "acks": "all",
        "enable_idempotence": True,
        "compression_type": None if settings.compression == "none" else settings.compression,
        "linger_ms": settings.linger_ms,
        "max_batch_size": settings.max_batch_size,
        "request_timeout_ms": settings.request_timeout_ms,
    }


def topic_configs(settings: KafkaSettings) -> dict[str, dict[str, str]]:
    """Topics the bridge writes, with their per-topic configs."""
    topics = settings.topics
    base: dict[str, str] = {}
    if settings.min_insync_replicas is not None:
        base["min.insync.replicas"] = str(settings.min_insync_replicas)
    return {
        topics.nav_ticks: dict(base),
        topics.vwap_ticks: dict(base),
        topics.settlements: dict(base),
        topics.dlq: dict(base),
        # Checkpoints: only the newest record per key matters.
        topics.state: {**base, "cleanup.policy": "compact"},
    }


async def _wait_for_leaders(admin: AIOKafkaAdminClient, names: list[str]) -> None:
    """New topics answer NotLeaderForPartition until every partition has a leader."""
    async with asyncio.timeout(TOPIC_READY_TIMEOUT_S):
        while True:
            described = await admin.describe_topics(names)
            if all(
                topic.get("error_code", 0) == 0
                and topic.get("partitions")
                and all(p.get("leader", -1) >= 0 for p in topic["partitions"])
                for topic in described
            ):
                return
            await asyncio.sleep(0.1)


async def ensure_topics(settings: KafkaSettings, names: list[str] | None = None) -> None:
    """Create the bridge's topics that do not exist yet (all of them, or `names`)."""
    configs = topic_configs(settings)
    wanted = names or list(configs)
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=name,
                num_partitions=settings.partitions,
                replication_factor=settings.replication_factor,
                topic_configs=configs.get(name, {}),
            )
            for name in wanted
            if name not in existing
        ]
        if not missing:
            return
        try:
            await admin.create_topics(missing)
        except TopicAlreadyExistsError:
            pass  # another replica created it first
        except KafkaError as exc:
            log.warning("could not create topics %s: %s", [t.name for t in missing], exc)
            raise
        await _wait_for_leaders(admin, [t.name for t in missing])
        log.info("created topics %s", [t.name for t in missing])
    finally:
        await admin.close()
