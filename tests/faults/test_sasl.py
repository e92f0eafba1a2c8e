"""Kafka with SASL_SSL and SCRAM-SHA-512, `kaiko-bridge run` as a real process.

With the right credentials the bridge connects, verifies the broker's certificate against
`kafka.ssl_cafile`, publishes and is ready; the password (given as `{env: NAME}` or
`{file: PATH}`, DEBUG logging on) is nowhere in its output, /metrics, records or headers.
A wrong password, an unknown user, a mechanism the listener does not offer or a CA that
did not sign the broker's certificate stop it within seconds: exit 2, one error naming the
setting to fix, and still no password.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from bridge.config import KafkaSettings, Topics
from bridge.consumer import KafkaRecord, RecordReader
from bridge.errors import BridgeError
from bridgedev import localkafka
from bridgedev.localkafka import LocalKafka
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.tls import TestCA
from bridgedev.sim.vinter import VinterSim
from tests.bridgeproc import (
    API_KEY,
    DAILY,
    KAIKO_KEY,
    NAV,
    TOKEN,
    free_port,
    get,
    start_bridge,
    stop,
    wait_status,
    write_config,
)
from tests.kafkautil import wait_for

USER = "bridge"
PASSWORD = "kafka-pass-SENTINEL-9c1d"
WRONG_PASSWORD = "kafka-wrong-SENTINEL-2b7e"
PASSWORD_ENV = "BRIDGE_TEST_KAFKA_PASSWORD"
# From spawning the process to its exit, Python start-up included: about 1-1.5 s, of which
# the refusal (first Kafka answer to exit) is under 0.7 s. The bound leaves room for a loaded
# machine; without failing fast the bridge would retry for ever.
FAIL_WITHIN_S = 20.0


@pytest.fixture(scope="module")
def sasl_kafka() -> Iterator[LocalKafka]:
    """One broker with a SASL_SSL listener that knows `USER`/`PASSWORD` (SCRAM-SHA-512)."""
    try:
        localkafka.fetch(quiet=True)
    except localkafka.LocalKafkaError as exc:
        pytest.fail(f"cannot provide a Kafka broker: {exc}", pytrace=False)
    broker = LocalKafka(scram_users={USER: PASSWORD})
    try:
        broker.start()
        yield broker
    finally:
        broker.stop()


def sasl_settings(broker: LocalKafka, topics: Topics) -> KafkaSettings:
    """What a client of the SASL_SSL listener needs (the tests' own reader)."""
    return KafkaSettings.model_validate(
        {
            "bootstrap_servers": broker.sasl_bootstrap,
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": USER,
            "sasl_password": PASSWORD,
            "ssl_cafile": broker.ca_file,
            "topics": topics,
        }
    )


def sasl_config(
    tmp_path: Path,
    broker: LocalKafka,
    vinter: VinterSim,
    kaiko: KaikoSim,
    ops_port: int,
    *,
    kafka: dict[str, Any],
    nav: list[str],
    daily: list[str],
) -> tuple[Path, Topics]:
    """The bridge's YAML file on the SASL_SSL listener; `kafka` adds or overrides keys."""
    topics = Topics.prefixed(f"s{uuid.uuid4().hex[:10]}")
    plain = KafkaSettings(bootstrap_servers=broker.sasl_bootstrap, topics=topics)
    path = write_config(tmp_path, plain, vinter, kaiko, ops_port, nav=nav, daily=daily)
    config = yaml.safe_load(path.read_text())
    config["kafka"].update(
        {
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": USER,
            "sasl_password": {"env": PASSWORD_ENV},
            "ssl_cafile": str(broker.ca_file),
            **kafka,
        }
    )
    path.write_text(yaml.safe_dump(config))
    return path, topics


async def read_all(
    settings: KafkaSettings, topic: str, *, at_least: int, timeout: float = 60.0
) -> list[KafkaRecord]:
    """Every record of `topic` up to its end, read over SASL_SSL, once there are enough."""
    async with asyncio.timeout(timeout):
        while True:
            async with RecordReader(settings, topic, stop_at_end=True) as reader:
                records = [record async for record in reader]
            if len(records) >= at_least:
                return records
            await asyncio.sleep(0.2)


def leaks(records: Sequence[KafkaRecord], secrets: Sequence[str]) -> list[str]:
    """Where a secret shows in a record's key, value or headers."""
    found = []
    for record in records:
        parts = [record.key or b"", record.value or b""]
        parts += [name.encode() + b"=" + value for name, value in record.headers]
        found += [
            f"{record.topic}@{record.offset}"
            for part in parts
            if any(secret.encode() in part for secret in secrets)
        ]
    return found


async def test_bridge_publishes_over_sasl_ssl(
    sasl_kafka: LocalKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    secrets = (PASSWORD, TOKEN, API_KEY, KAIKO_KEY)
    ops_port = free_port()
    async with (
        VinterSim([*NAV, *DAILY], token=TOKEN, api_key=API_KEY, rate=20, history_days=5) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=20) as kaiko,
    ):
        vinter.malformed_every = 7  # some dead letters, to look for the password in them too
        config, topics = sasl_config(
            tmp_path, sasl_kafka, vinter, kaiko, ops_port, kafka={}, nav=NAV, daily=DAILY
        )
        settings = sasl_settings(sasl_kafka, topics)
        proc = await start_bridge(config)
        try:
            base = f"http://127.0.0.1:{ops_port}"
            await wait_status(f"{base}/readyz", 200, timeout=60)
            records = {
                topic: await read_all(settings, topic, at_least=3)
                for topic in (topics.nav_ticks, topics.vwap_ticks, topics.settlements, topics.dlq)
            }
            status, ready = await get(f"{base}/readyz")
            metrics_status, metrics = await get(f"{base}/metrics")
        finally:
            code, output = await stop(proc, config)
    assert code == 0, output[-3000:]
    assert "stopped cleanly" in output
    assert status == 200, ready
    assert metrics_status == 200
    assert "bridge_events_published" in metrics
    assert {r.key for r in records[topics.settlements]} == {s.encode() for s in DAILY}
    assert all(r.headers for r in records[topics.nav_ticks])
    assert not [s for s in secrets if s in output]  # DEBUG logging on
    assert not [s for s in secrets if s in metrics or s in ready]
    assert not [where for rs in records.values() for where in leaks(rs, secrets)]


async def test_plaintext_clients_cannot_read_the_sasl_listener(sasl_kafka: LocalKafka) -> None:
    """The SASL_SSL port really demands TLS and SCRAM: a bridge without them is refused."""
    settings = KafkaSettings(bootstrap_servers=sasl_kafka.sasl_bootstrap, request_timeout_ms=2000)
    with pytest.raises(BridgeError, match=r"cannot (read|reach Kafka)"):
        async with asyncio.timeout(30), RecordReader(settings, "any", stop_at_end=True):
            pass


WRONG_CA = "wrong-ca"
MISSING_CA = "missing-ca"
# case -> (keys of the `kafka:` config section to add or override, parts of the one error)
REFUSALS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "wrong password": (
        {"sasl_password": {"file": "<password file>"}},
        ("kafka.sasl_password", "kafka.sasl_username", f"user '{USER}'", "SCRAM-SHA-512"),
    ),
    "unknown user": (
        {"sasl_username": "nobody"},
        ("kafka.sasl_password", "kafka.sasl_username", "user 'nobody'"),
    ),
    "wrong mechanism": (
        {"sasl_mechanism": "SCRAM-SHA-256"},
        ("kafka.sasl_mechanism", "SCRAM-SHA-256"),
    ),
    "CA that did not sign the broker": (
        {"ssl_cafile": WRONG_CA},
        ("kafka.ssl_cafile", "cannot verify the certificate", "other-ca.pem"),
    ),
    "CA file missing": (
        {"ssl_cafile": MISSING_CA},
        ("kafka.ssl_cafile", "No such file"),
    ),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_refused_connection_stops_at_once_naming_the_setting(
    case: str, sasl_kafka: LocalKafka, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    override, expected = REFUSALS[case]
    kafka = dict(override)
    if kafka.get("sasl_password"):
        (tmp_path / "kafka-password").write_text(WRONG_PASSWORD + "\n")
        kafka["sasl_password"] = {"file": str(tmp_path / "kafka-password")}
    if kafka.get("ssl_cafile") == WRONG_CA:
        kafka["ssl_cafile"] = str(TestCA().write_ca(tmp_path / "other-ca.pem"))
    if kafka.get("ssl_cafile") == MISSING_CA:
        kafka["ssl_cafile"] = str(tmp_path / "no-such-ca.pem")
    async with (
        VinterSim(NAV, token=TOKEN, api_key=API_KEY, rate=20) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=20) as kaiko,
    ):
        config, _ = sasl_config(
            tmp_path, sasl_kafka, vinter, kaiko, free_port(), kafka=kafka, nav=NAV, daily=[]
        )
        began = time.monotonic()
        proc = await start_bridge(config)
        try:
            await asyncio.wait_for(proc.wait(), FAIL_WITHIN_S)
        finally:
            code, output = await stop(proc, config)
        took = time.monotonic() - began
        assert vinter.ws_attempts == 0  # refused before any source started
    assert code == 2, output[-3000:]
    assert took < FAIL_WITHIN_S
    errors = [line for line in output.splitlines() if line.startswith("kaiko-bridge: ")]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("kaiko-bridge: invalid configuration: kafka.")
    for part in expected:
        assert part in errors[0], errors[0]
    assert "retrying" not in output  # no backoff loop before giving up
    assert PASSWORD not in output
    assert WRONG_PASSWORD not in output


async def test_a_broker_not_up_yet_is_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failing fast is for refusals only: while nothing listens on the SASL_SSL port the
    bridge waits (503), and once the broker is up it connects with the same settings."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORD)
    localkafka.broker_tls(tmp_path / "tls")  # the CA file is there before the broker
    broker = LocalKafka(scram_users={USER: PASSWORD}, tls_dir=tmp_path / "tls")
    ops_port = free_port()
    readyz = f"http://127.0.0.1:{ops_port}/readyz"
    async with (
        VinterSim(NAV, token=TOKEN, api_key=API_KEY, rate=20) as vinter,
        KaikoSim(api_key=KAIKO_KEY, rate=20) as kaiko,
    ):
        config, topics = sasl_config(
            tmp_path, broker, vinter, kaiko, ops_port, kafka={}, nav=NAV, daily=[]
        )
        log = config.with_suffix(".log")
        proc = await start_bridge(config)
        try:
            await wait_for(lambda: "is not reachable" in log.read_text(), timeout=30)
            waiting, _ = await get(readyz)
            alive = proc.returncode is None
            await broker.astart()
            await wait_status(readyz, 200, timeout=90)
            records = await read_all(sasl_settings(broker, topics), topics.nav_ticks, at_least=1)
        finally:
            code, output = await stop(proc, config)
            await broker.astop()
    assert waiting == 503
    assert alive
    assert code == 0, output[-3000:]
    assert records
    assert "invalid configuration" not in output
    assert PASSWORD not in output
