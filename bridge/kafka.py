"""Kafka connection settings and topic administration shared by every client the bridge makes.

A broker that turns the bridge away for a reason no retry can fix (SASL credentials
rejected, a mechanism it does not offer, a certificate the configured CA does not vouch
for) is reported by :func:`check_access` as a `ConfigError` naming the setting to change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import AsyncIterator
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.client import AIOKafkaClient
from aiokafka.conn import create_conn
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaError,
    SaslAuthenticationFailed,
    TopicAlreadyExistsError,
    UnsupportedSaslMechanismError,
)

from bridge.aiokafka_internals import (
    MetadataUpdate,
    client_of,
    drop_bootstrap_connection,
    wrap_metadata_update,
)
from bridge.backoff import Backoff
from bridge.config import KafkaSettings
from bridge.errors import ConfigError
from bridge.tasks import stop_within

log = logging.getLogger(__name__)

TOPIC_READY_TIMEOUT_S = 30.0
ACCESS_CHECK_TIMEOUT_S = 5.0


def client_kwargs(settings: KafkaSettings) -> dict[str, Any]:
    """Connection arguments common to producers, consumers and the admin client."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "client_id": settings.client_id,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = _ssl_context(settings)
    if settings.security_protocol.startswith("SASL_"):
        password = settings.sasl_password
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    return kwargs


#: Delays between failed metadata refreshes, Kafka's Java client defaults: retry.backoff.ms
#: (100 ms), doubling up to retry.backoff.max.ms (1 s), with jitter.
METADATA_RETRY_S = 0.1
METADATA_RETRY_MAX_S = 1.0


def pace_metadata_retries(client: AIOKafkaClient) -> None:
    """Make every failed metadata refresh of `client` wait before it reports back.

    aiokafka retries at once: with the brokers down and a batch waiting for its partition's
    leader, its sender asks for metadata again as soon as an attempt fails. That spun a core
    (88 %) and logged two ERROR lines per attempt, about 4,000 a second; paced, an outage
    costs two lines per attempt at one attempt a second at most, and a broker that comes
    back is found within that second.
    """
    backoff = Backoff(initial=METADATA_RETRY_S, multiplier=2.0, cap=METADATA_RETRY_MAX_S)

    def pacing(update: MetadataUpdate) -> MetadataUpdate:
        async def paced(cluster: Any, topics: Any) -> bool:
            updated = await update(cluster, topics)
            if updated:
                backoff.reset()
            else:
                await asyncio.sleep(backoff.next_delay())
            return updated

        return paced

    wrap_metadata_update(client, pacing)


def new_producer(settings: KafkaSettings, **kwargs: Any) -> AIOKafkaProducer:
    """A producer with the bridge's settings (`producer_kwargs`) and paced metadata retries;
    a transactional one with `kafka.transaction_timeout_ms`."""
    if kwargs.get("transactional_id") is not None:
        kwargs.setdefault("transaction_timeout_ms", settings.transaction_timeout_ms)
    producer = AIOKafkaProducer(**producer_kwargs(settings), **kwargs)
    pace_metadata_retries(producer.client)
    return producer


def new_consumer(settings: KafkaSettings, *topics: str, **kwargs: Any) -> AIOKafkaConsumer:
    """A consumer with the bridge's connection settings and paced metadata retries."""
    consumer = AIOKafkaConsumer(*topics, **client_kwargs(settings), **kwargs)
    pace_metadata_retries(client_of(consumer))
    return consumer


def _ssl_context(settings: KafkaSettings) -> ssl.SSLContext:
    """Verifies the broker's certificate and host name against `ssl_cafile` (or the system
    roots); a CA file that cannot be loaded is a configuration error, not a retry."""
    cafile = settings.ssl_cafile
    try:
        return ssl.create_default_context(cafile=str(cafile) if cafile else None)
    except OSError as exc:  # ssl.SSLError is an OSError too
        reason = exc.strerror or getattr(exc, "reason", None) or str(exc)
        raise ConfigError("kafka.ssl_cafile", f"cannot load CA file {cafile}: {reason}") from exc


#: How long a short-lived consumer's `stop()` may take (see `short_consumer`).
CONSUMER_STOP_S = 2.0
#: How long the broker may hold a short-lived consumer's fetch for data to arrive. A bounded
#: read wants what is there: at aiokafka's 500 ms, each seek that waits behind a fetch of a
#: partition already at its end cost half a second, several times per hand-over.
SHORT_FETCH_WAIT_MS = 20


@contextlib.asynccontextmanager
async def short_consumer(settings: KafkaSettings, **kwargs: Any) -> AsyncIterator[AIOKafkaConsumer]:
    """A started consumer for one bounded read (no group, no commits), stopped on the way out
    without waiting for the TLS goodbye.

    aiokafka's `stop()` ends by waiting for each connection to finish closing. Over SASL_SSL
    that wait was seen to last exactly 30 s (asyncio's TLS shutdown timeout) on a consumer
    that had read everything, which held start-up recovery up 30 s per topic; plaintext
    closes at once. By then its fetches are cancelled and its sockets told to close: only
    that wait is cut short.
    """
    kwargs.setdefault("fetch_max_wait_ms", SHORT_FETCH_WAIT_MS)
    consumer = new_consumer(settings, enable_auto_commit=False, **kwargs)
    try:
        await consumer.start()
        yield consumer
    finally:
        await stop_within(consumer.stop(), CONSUMER_STOP_S)


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


def access_error(settings: KafkaSettings, address: str, exc: BaseException) -> ConfigError | None:
    """The configuration error behind a failed connection to `address`, or None when the
    failure may be transient (broker down, network) and retrying is right."""
    user, mechanism = settings.sasl_username, settings.sasl_mechanism
    if isinstance(exc, SaslAuthenticationFailed):
        # Kafka answers an unknown user and a wrong password alike, on purpose.
        key = "kafka.sasl_password"
        message = (
            f"Kafka at {address} rejected user {user!r} with {mechanism} ({exc}); "
            "check kafka.sasl_username and kafka.sasl_password"
        )
    elif isinstance(exc, UnsupportedSaslMechanismError):
        key = "kafka.sasl_mechanism"
        offered = str(exc).partition("Enabled mechanisms are: ")[2]
        message = f"Kafka at {address} does not offer {mechanism} on this listener" + (
            f" (it offers {offered})" if offered else ""
        )
    elif isinstance(exc, IllegalSaslStateError):
        key = "kafka.security_protocol"
        message = (
            f"Kafka at {address} does not expect SASL on this listener "
            f"({settings.security_protocol}); use the matching listener or protocol"
        )
    elif isinstance(exc, ssl.SSLCertVerificationError):
        key = "kafka.ssl_cafile"
        trusted = f"the CA in {settings.ssl_cafile}" if settings.ssl_cafile else "system roots"
        message = (
            f"cannot verify the certificate of Kafka at {address} against {trusted}: "
            f"{getattr(exc, 'verify_message', None) or exc}"
        )
    else:
        return None
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
    if len(password) >= 4:  # a broker has no reason to echo it; be sure anyway
        message = message.replace(password, "***")
    return ConfigError(key, message)


def _host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit():
        return address.strip().strip("[]"), 9092
    return host.strip("[]"), int(port)


async def check_access(settings: KafkaSettings, *, timeout: float = ACCESS_CHECK_TIMEOUT_S) -> None:
    """After clients failed to bootstrap: connect to each bootstrap server once, as they do,
    and raise `ConfigError` if one turns the bridge away for a reason that retrying cannot
    fix. Returns when a server takes the connection, when none answers, or after `timeout`
    (inconclusive: the caller retries)."""
    kwargs = client_kwargs(settings)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            for address in settings.bootstrap_servers.split(","):
                host, port = _host_port(address)
                try:
                    conn = await create_conn(
                        host,
                        port,
                        client_id=kwargs["client_id"],
                        request_timeout_ms=int(timeout * 1000),
                        ssl_context=kwargs.get("ssl_context"),
                        security_protocol=settings.security_protocol,
                        sasl_mechanism=kwargs.get("sasl_mechanism"),
                        sasl_plain_username=kwargs.get("sasl_plain_username"),
                        sasl_plain_password=kwargs.get("sasl_plain_password"),
                    )
                except (KafkaError, OSError, TimeoutError) as exc:
                    error = access_error(settings, f"{host}:{port}", exc)
                    if error is not None:
                        raise error from exc
                    continue
                conn.close()
                return


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


async def _know_a_broker(client: AIOKafkaClient, timeout: float) -> None:
    """Bootstrap `client` again until its metadata lists a broker.

    aiokafka's bootstrap accepts a metadata answer that lists none, and an admin client then
    fails every request at once: it sends to a random broker of its metadata
    (NodeNotReadyError, node id None). Seen once in a bench stage on this project's loaded
    2-core machine, the broker up for minutes.
    """
    async with asyncio.timeout(timeout):
        while not client.cluster.brokers():
            await asyncio.sleep(METADATA_RETRY_S)
            # bootstrap() keeps its connection when it finds no broker, replacing any kept one
            drop_bootstrap_connection(client)
            await client.bootstrap()


@contextlib.asynccontextmanager
async def admin_client(settings: KafkaSettings) -> AsyncIterator[AIOKafkaAdminClient]:
    """A started admin client, closed on the way out."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    pace_metadata_retries(client_of(admin))
    await admin.start()
    try:
        await _know_a_broker(client_of(admin), settings.request_timeout_ms / 1000)
        yield admin
    finally:
        await admin.close()


async def ensure_topics(settings: KafkaSettings, names: list[str] | None = None) -> None:
    """Create the bridge's topics that do not exist yet (all of them, or `names`)."""
    async with admin_client(settings) as admin:
        await create_missing_topics(admin, settings, names)


async def create_missing_topics(
    admin: AIOKafkaAdminClient, settings: KafkaSettings, names: list[str] | None = None
) -> None:
    """`ensure_topics` within an admin session the caller holds."""
    configs = topic_configs(settings)
    existing = set(await admin.list_topics())
    missing = [
        NewTopic(
            name=name,
            num_partitions=settings.partitions,
            replication_factor=settings.replication_factor,
            topic_configs=configs.get(name, {}),
        )
        for name in names or list(configs)
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


async def check_topics(
    admin: AIOKafkaAdminClient, settings: KafkaSettings, *, min_retention_ms: int | None = None
) -> None:
    """Refuse to start on topics the bridge cannot rely on, with a `ConfigError` naming the
    topic and the setting to change.

    * A topic that takes smaller records than `kafka.max_batch_size` (`max.message.bytes`):
      Kafka would refuse full batches for good, and re-sending one would hold its partition
      forever.
    * A state topic that is not compacted: checkpoints are read back by key, and deleting
      them by age would lose the marks.
    * An output topic whose `retention.ms` is under `min_retention_ms`: recovery reads the
      marks back from it, and a record deleted before the bridge restarted is a mark lost
      (then published twice).

    Topics this principal may not describe are left unchecked, with a warning.
    """
    limit, policy, retention = "max.message.bytes", "cleanup.policy", "retention.ms"
    topics = settings.topics
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, {limit: None, policy: None, retention: None})
        for name in sorted(topic_configs(settings))
    ]
    try:
        responses = await admin.describe_configs(resources)
    except KafkaError as exc:
        log.warning("could not read the topics' configuration (%s); not checked", exc)
        return
    for error_code, _message, _type, name, entries, *_ in (
        resource for response in responses for resource in response.resources
    ):
        values = {entry[0]: entry[1] for entry in entries}
        if error_code or limit not in values:
            log.warning("could not read the configuration of topic %s (error %d)", name, error_code)
            continue
        if int(values[limit]) < settings.max_batch_size:
            raise ConfigError(
                "kafka.max_batch_size",
                f"{settings.max_batch_size} bytes, but topic {name} takes records of at most "
                f"{values[limit]} bytes ({limit}): Kafka would refuse full batches for good. "
                f"Set kafka.max_batch_size to at most {values[limit]}, or raise the topic's "
                f"{limit}",
            )
        if name == topics.state and "compact" not in str(values.get(policy, "")).split(","):
            raise ConfigError(
                "kafka.topics.state",
                f"topic {name} has {policy}={values.get(policy)}; the bridge reads its "
                f"checkpoints back by key and needs {policy}=compact (alter the topic, or name "
                "another one)",
            )
        kept = int(values.get(retention) or -1)
        reads_back = name in (topics.nav_ticks, topics.vwap_ticks)
        if reads_back and min_retention_ms is not None and 0 <= kept < min_retention_ms:
            raise ConfigError(
                "vinter.backfill_max_age_s",
                f"topic {name} keeps records {kept // 1000} s ({retention}), less than the "
                f"{min_retention_ms // 1000} s the bridge reads back to recover its marks "
                f"after an outage: raise the topic's {retention}, or lower "
                "vinter.backfill_max_age_s",
            )
