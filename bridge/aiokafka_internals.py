"""Every use of aiokafka's private names, in one module, checked against the installed version.

The bridge needs a few things aiokafka does not expose (each function says why). `check()`
runs at start: an aiokafka that lacks one of them fails with an error naming the version
and the names, rather than quietly losing the guarantee the name stood for.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from importlib.metadata import version
from typing import Any

import aiokafka.producer.sender
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.client import AIOKafkaClient, ConnectionGroup
from aiokafka.errors import KafkaError, UnknownError

from bridge.errors import DependencyError

#: The aiokafka version these names were read from (the one `requirements.lock` pins).
TESTED_WITH = "0.14.0"
#: How long a transactional producer waits before asking again to add a partition to its
#: next transaction while the broker still writes the last one's markers (aiokafka: 20 ms,
#: which made every transaction last 25 ms on a local broker; 2 ms: 5 ms, docs/performance.md).
TXN_RETRY_S = 0.002
#: Never connected to: the probe objects are built, inspected and closed, never started.
_PROBE_BOOTSTRAP = "127.0.0.1:9"

MetadataUpdate = Callable[[Any, Any], Awaitable[bool]]


def _missing_names(
    producer: AIOKafkaProducer, consumer: AIOKafkaConsumer, admin: AIOKafkaAdminClient
) -> list[str]:
    expected: dict[str, Callable[[], object]] = {
        "AIOKafkaProducer._message_accumulator._batch_ttl": lambda: (
            producer._message_accumulator._batch_ttl
        ),
        "AIOKafkaProducer._sender.sender_task": lambda: producer._sender.sender_task,
        "MessageAccumulator.fail_all": lambda: producer._message_accumulator.fail_all,
        "AIOKafkaProducer._txn_manager.producer_id": lambda: producer._txn_manager.producer_id,
        "TransactionManager._transaction_waiter": lambda: producer._txn_manager._transaction_waiter,
        "AIOKafkaConsumer._client": lambda: consumer._client,
        "AIOKafkaAdminClient._client": lambda: admin._client,
        "AIOKafkaClient._metadata_update": lambda: AIOKafkaClient._metadata_update,
        "AIOKafkaClient._wait_on_metadata": lambda: AIOKafkaClient._wait_on_metadata,
        "AIOKafkaClient._conns": lambda: consumer._client._conns,
        "aiokafka.producer.sender.BACKOFF_OVERRIDE": lambda: (
            aiokafka.producer.sender.BACKOFF_OVERRIDE
        ),
    }
    missing = []
    for name, read in expected.items():
        try:
            read()
        except AttributeError:
            missing.append(name)
    return missing


async def check() -> None:
    """Fail with `DependencyError` if the installed aiokafka lacks a name the bridge uses.

    The objects it inspects are never started (no connection); it takes about a millisecond.
    """
    producer = AIOKafkaProducer(bootstrap_servers=_PROBE_BOOTSTRAP, enable_idempotence=True)
    consumer = AIOKafkaConsumer(bootstrap_servers=_PROBE_BOOTSTRAP)
    admin = AIOKafkaAdminClient(bootstrap_servers=_PROBE_BOOTSTRAP)
    try:
        missing = _missing_names(producer, consumer, admin)
    finally:
        await producer.stop()
        await consumer.stop()
        await admin.close()
    if missing:
        raise DependencyError(
            f"aiokafka {version('aiokafka')} lacks {', '.join(missing)}, which kaiko-bridge "
            f"relies on (tested with aiokafka {TESTED_WITH}); install aiokafka=={TESTED_WITH}"
        )


def keep_batches_until_a_leader(producer: AIOKafkaProducer) -> None:
    """Queued batches wait for their partition's leader as long as it takes.

    aiokafka expires a queued batch whose partition has no leader once it is older than
    `request_timeout_ms`; re-sent, a batch already written would be written twice, and its
    hole in the sequence numbers makes the broker refuse the partition's later batches.
    """
    producer._message_accumulator._batch_ttl = math.inf


def retry_transactions_sooner() -> None:
    """Poll for the end of the last transaction's markers every `TXN_RETRY_S`.

    After a commit, Kafka answers the next transaction's first AddPartitionsToTxn with
    CONCURRENT_TRANSACTIONS until it has written the markers; aiokafka then waits a fixed
    20 ms (its `BACKOFF_OVERRIDE`), which bounded a shard to one transaction per 25 ms.
    """
    aiokafka.producer.sender.BACKOFF_OVERRIDE = TXN_RETRY_S


def sender_task(producer: AIOKafkaProducer) -> asyncio.Task[Any] | None:
    """The producer's sender task: its end is the only sign of aiokafka#1017 (a producer
    that accepts sends it will never deliver)."""
    task: asyncio.Task[Any] | None = producer._sender.sender_task
    return task


def fail_held_batches(producer: AIOKafkaProducer, exc: BaseException) -> None:
    """Fail the batches a dropped producer still holds, so that its `stop()` can end.

    `stop()` waits for them in a task of its own and, once the sender task has ended,
    returns without it; that task then waits forever, and asyncio logs "Task was destroyed
    but it is pending!" when the producer is collected.
    """
    producer._message_accumulator.fail_all(exc)


def coordinator_failed(exc: BaseException) -> bool:
    """Whether the sender stopped on an UNKNOWN_SERVER_ERROR from the transaction coordinator
    (aiokafka raises it as the cause of its own `KafkaError`). Kafka answers a commit so when
    it races another instance's start: the coordinator is still fencing this producer."""
    return isinstance(exc, KafkaError) and isinstance(exc.__cause__, UnknownError)


def producer_id(producer: AIOKafkaProducer) -> int | None:
    """The idempotent producer id the broker assigned, or None before it has one."""
    manager = producer._txn_manager
    pid = None if manager is None else manager.producer_id
    return pid if isinstance(pid, int) and pid >= 0 else None


def forget_fatal_error(producer: AIOKafkaProducer) -> None:
    """Mark a dropped producer's fatal error as seen wherever aiokafka left it on a future
    nobody awaits (the transaction waiter, the drain waiter of each failed batch): asyncio
    would log each at exit as "never retrieved", an ERROR for a fencing already handled."""
    accumulator = producer._message_accumulator
    batches = [b for queue in accumulator._batches.values() for b in queue]
    waiters = [getattr(b, "_drain_waiter", None) for b in [*batches, *accumulator._pending_batches]]
    manager = producer._txn_manager
    waiters.append(None if manager is None else manager._transaction_waiter)
    for waiter in waiters:
        if waiter is not None and waiter.done() and not waiter.cancelled():
            waiter.exception()


def client_of(owner: AIOKafkaConsumer | AIOKafkaAdminClient) -> AIOKafkaClient:
    """The network client of a consumer or an admin client (a producer's is public)."""
    client: AIOKafkaClient = owner._client
    return client


def wrap_metadata_update(
    client: AIOKafkaClient, wrap: Callable[[MetadataUpdate], MetadataUpdate]
) -> None:
    """Replace the one call every metadata refresh of `client` makes by `wrap(call)`."""
    client._metadata_update = wrap(client._metadata_update)


async def partitions_now(client: AIOKafkaClient, topic: str) -> set[int]:
    """The partitions of `topic`, fetching metadata until the client knows them (the public
    `partitions_for_topic` answers only from what the client already fetched)."""
    partitions: set[int] | None = await client._wait_on_metadata(topic)
    return set(partitions or ())


def drop_bootstrap_connection(client: AIOKafkaClient) -> None:
    """Close the connection `bootstrap()` kept, so the next bootstrap opens a new one."""
    kept = client._conns.pop(("bootstrap", ConnectionGroup.DEFAULT), None)
    if kept is not None:
        kept.close()
