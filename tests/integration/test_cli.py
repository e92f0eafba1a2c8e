"""The command line as a user meets it, each command a real process: a mistake is one line
on stderr and exit code 2 (1 for a Kafka that cannot be reached), never a traceback; replay
and topics against a real broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from bridge.config import KafkaSettings
from bridge.publish import Publisher
from tests.conftest import KafkaEndpoint, NewTopic
from tests.samples import nav_event

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000


def cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> Any:
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def one_line(text: str) -> str:
    assert text.strip().count("\n") == 0, text
    return text.strip()


# -- configuration -----------------------------------------------------------------------------


def test_run_needs_a_config_file() -> None:
    done = cli("run")
    assert done.returncode == 2
    assert "the following arguments are required: --config" in done.stderr


def test_run_refuses_when_nothing_is_configured(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka: {bootstrap_servers: '127.0.0.1:1'}\n")
    done = cli("run", "--config", str(path))
    assert done.returncode == 2
    assert "nothing is configured to run" in one_line(done.stderr)
    checked = cli("check-config", str(path))
    assert checked.returncode == 0
    assert "warning: nothing is configured to run" in checked.stderr


def test_check_config_reports_every_problem_and_where_it_came_from(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("kafka:\n  partitons: 3\n  linger_ms: -1\n")
    done = cli("check-config", str(path), env={"KAIKO_BRIDGE__OPS__PORT": "70000"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[0] == "kaiko-bridge: invalid configuration: 3 problems:"
    assert f"  kafka.partitons: unknown key; did you mean partitions? (from {path})" in lines
    assert any(line.startswith("  kafka.linger_ms: ") and str(path) in line for line in lines)
    assert any(
        line.startswith("  ops.port: ") and "environment variable KAIKO_BRIDGE__OPS__PORT" in line
        for line in lines
    )


def test_schemas_names_what_exists() -> None:
    done = cli("schemas", "vinter.nav.tik")
    assert done.returncode == 2
    assert "known: bridge.deadletter, bridge.gap" in one_line(done.stderr)
    done = cli("schemas", "vinter.nav.tick", "--version", "9")
    assert done.returncode == 2
    assert "vinter.nav.tick has no version 9; versions: 1, 2" in one_line(done.stderr)
    done = cli("schemas", "vinter.nav.tick", "--version", "1")
    assert done.returncode == 0
    assert json.loads(done.stdout)["$id"].endswith(":1")


# -- replay and topics -------------------------------------------------------------------------


@pytest.fixture
async def ticks(kafka_settings: KafkaSettings, new_topic: NewTopic) -> str:
    topic = await new_topic(partitions=3)
    settings = kafka_settings.model_copy(
        update={"topics": kafka_settings.topics.model_copy(update={"nav_ticks": topic})}
    )
    async with Publisher(settings) as publisher:
        for i in range(10):
            await publisher.publish(nav_event(f"vnfa-c{i % 2}-r", T0 + i))
        await publisher.flush(30)
    return topic


async def test_replay_output_paths(kafka: KafkaEndpoint, ticks: str, tmp_path: Path) -> None:
    base = ("replay", ticks, "--bootstrap", kafka.bootstrap)
    done = cli(*base, "-o", "/nonexistent/x")
    assert done.returncode == 2
    assert "cannot write /nonexistent/x: No such file or directory" in one_line(done.stderr)
    done = cli(*base, "-o", str(tmp_path))
    assert done.returncode == 2
    assert f"cannot write {tmp_path}: Is a directory" in one_line(done.stderr)
    done = cli(*base, "-o", "-")
    assert done.returncode == 0
    assert len(done.stdout.splitlines()) == 10


async def test_replay_argument_mistakes_are_usage_errors(kafka: KafkaEndpoint, ticks: str) -> None:
    base = ("replay", ticks, "--bootstrap", kafka.bootstrap)
    for args, message in (
        (("--keep-timestamps",), "--keep-timestamps applies only with --to-topic"),
        (("--create",), "--create applies only with --to-topic"),
        (("--from-time", "2024-05-02", "--to-time", "2024-05-01"), "is after --to-time"),
        (("--from-offset", "5", "--to-offset", "2"), "--from-offset 5 is after --to-offset 2"),
        (("--from-time", "yesterday"), "give an ISO 8601 time"),
        (("--count", "0"), "give a count of at least 1"),
    ):
        done = cli(*base, *args)
        assert done.returncode == 2, args
        assert message in done.stderr, (args, done.stderr)


async def test_replay_to_a_missing_topic_says_how_to_create_it(
    kafka: KafkaEndpoint, ticks: str, kafka_settings: KafkaSettings
) -> None:
    target = f"{ticks}-copy"
    began = time.monotonic()
    done = cli("replay", ticks, "--bootstrap", kafka.bootstrap, "--to-topic", target)
    assert time.monotonic() - began < 20
    assert done.returncode == 2
    assert f"topic {target} does not exist; add --create" in one_line(done.stderr)
    assert "3 partitions" in done.stderr
    done = cli("replay", ticks, "--bootstrap", kafka.bootstrap, "--to-topic", target, "--create")
    assert done.returncode == 0, done.stderr
    listed = cli("topics", "--bootstrap", kafka.bootstrap)
    rows = {line.split()[0]: line.split() for line in listed.stdout.splitlines()[1:]}
    assert rows[target][1:3] == ["3", "10:"]
    assert rows[ticks][1:3] == ["3", "10:"]


async def test_replay_formats_counts_and_relative_times(kafka: KafkaEndpoint, ticks: str) -> None:
    base = ("replay", ticks, "--bootstrap", kafka.bootstrap)
    done = cli(*base, "--format", r"%t|%p|%o|%k|%K|%S|%h\n", "--count", "3")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3
    for line in lines:
        topic, partition, offset, key, key_len, value_len, headers = line.split("|")
        assert topic == ticks
        assert int(partition) in (0, 1, 2)
        assert int(offset) >= 0
        assert key.startswith("vnfa-c")
        assert int(key_len) == len(key)
        assert int(value_len) > 100
        assert "event-type=vinter.nav.tick" in headers
    done = cli(*base, "--format", "json", "--count", "1")
    [doc] = [orjson.loads(line) for line in done.stdout.splitlines()]
    assert set(doc) == {"topic", "partition", "offset", "timestamp", "key", "headers", "value"}
    assert doc["value"]["type"] == "vinter.nav.tick"
    assert doc["headers"]["schema-version"] == "2"
    recent = cli(*base, "--from-time", "-1h")
    assert len(recent.stdout.splitlines()) == 10  # written seconds ago
    future = cli(*base, "--from-time", "-0s")
    assert future.stdout == ""


async def test_the_bootstrap_default_is_the_local_broker_then_one_clear_line(
    kafka: KafkaEndpoint, ticks: str, tmp_path: Path
) -> None:
    (tmp_path / "broker.json").write_text(json.dumps({"bootstrap": kafka.bootstrap}))
    done = cli("replay", ticks, "--count", "2", env={"BRIDGE_KAFKA_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2
    began = time.monotonic()
    done = cli("replay", ticks, "--bootstrap", "127.0.0.1:1")
    assert done.returncode == 1
    assert one_line(done.stderr) == (
        "kaiko-bridge: cannot reach Kafka at 127.0.0.1:1: no broker answered"
    )
    assert time.monotonic() - began < 30
    done = cli("topics", "--bootstrap", "127.0.0.1:1")
    assert done.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in one_line(done.stderr)
