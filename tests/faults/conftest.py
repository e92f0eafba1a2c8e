"""Fixtures of the fault suite: a 3-node Kafka cluster shared by the session.

Every test here is marked `faults` (run them alone with `make faults`). The cluster is
three combined broker+controller processes on loopback (`LocalKafkaCluster`); topics the
bridge creates on it have replication factor 3 and `min.insync.replicas=2`, so one node can
be killed or paused at any time without losing an acknowledged event. Tests that kill or
pause a node must leave all three running when they end (`all_nodes_up`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from bridge.config import KafkaSettings, Topics
from bridgedev import localkafka
from bridgedev.localkafka import LocalKafkaCluster


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/tests/faults/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.faults)
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalKafkaCluster]:
    """The session's 3-node cluster; started on first use, stopped at the end."""
    try:
        localkafka.fetch(quiet=True)
    except localkafka.LocalKafkaError as exc:
        pytest.fail(f"cannot provide a Kafka cluster: {exc}", pytrace=False)
    nodes = LocalKafkaCluster(nodes=3)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def all_nodes_up(cluster: LocalKafkaCluster) -> None:
    """Resume paused nodes and restart killed ones, then wait until all three answer."""
    for node in cluster.nodes:
        if node.paused:
            node.resume()
    cluster.start()


@pytest.fixture
def cluster_settings(cluster: LocalKafkaCluster) -> Iterator[KafkaSettings]:
    """Kafka settings on the cluster (RF 3, min ISR 2) with topics no other test uses.

    Restores every node afterwards, so one test's fault never leaks into the next.
    """
    yield KafkaSettings(
        bootstrap_servers=cluster.bootstrap,
        partitions=3,
        replication_factor=3,
        min_insync_replicas=2,
        linger_ms=2,
        topics=Topics.prefixed(f"f{uuid.uuid4().hex[:10]}"),
    )
    all_nodes_up(cluster)
