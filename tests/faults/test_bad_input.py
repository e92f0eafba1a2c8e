"""Bad input end to end: nothing upstream crashes the bridge; every refusal is a dead
letter with a reason.

The bridge as a process, on a real broker, fed by the simulators over real sockets
(WebSocket, REST, gRPC over TLS), with the hand-written cases of `tests/malformed.py`:
every case lands in the dead-letter topic with its reason and is counted by
`bridge_dead_letters_total`; the valid records around the cases all arrive; no sentinel
secret shows in dead letters, headers, logs or metrics (DEBUG logging). The parsers' own
proofs over generated input are in `tests/unit/test_decoders.py`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from google.protobuf import text_format
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import KafkaSettings, Topics
from bridge.events import VWAP_TICK, raw_text
from bridge.sources.vinter_rest import SOURCE as REST_SOURCE
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.vinter import Frequency, VinterSim
from tests.bridgeproc import (
    API_KEY,
    KAIKO_KEY,
    TOKEN,
    free_port,
    get,
    start_bridge,
    stop,
    wait_status,
)
from tests.conftest import KafkaEndpoint
from tests.kafkautil import read_topic, values, wait_for
from tests.malformed import (
    DOC_VWAP,
    body_cases,
    daily_record_cases,
    dumps,
    envelope,
    nav_record_cases,
    vwap_cases,
    ws_cases,
)

RT = "vnfa-btca-15-r"
SETTLED = "vnfa-btca-15-d"
INSTRUMENT = ("cbse", "spot", "btc-usd")
VWAP_SOURCE = "kaiko.vwap:cbse:spot:btc-usd:1s"
WS_SOURCE = f"vinter.nav:{RT}"
SETTLEMENT_SOURCE = "vinter.settlement"
SECRETS = (TOKEN, API_KEY, KAIKO_KEY)

# (source, reason, raw text, raw encoding) of every dead letter expected
Letters = Counter[tuple[str, str, str, str]]


def _expect(letters: Letters, source: str, reason: str, raw: bytes) -> None:
    text, encoding = raw_text(raw)
    letters[(source, reason, text, encoding)] += 1


def _ws_raws(message: str | bytes) -> list[bytes]:
    """What the socket source dead-letters for a message: the message itself, or for a
    batch each refused record as orjson writes it."""
    raw = message.encode() if isinstance(message, str) else message
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return [raw]
    return [orjson.dumps(item) for item in doc] if type(doc) is list else [raw]


@pytest.fixture
def broker_settings(kafka: KafkaEndpoint) -> KafkaSettings:
    """The session's single broker, with topics no other test uses."""
    return KafkaSettings(
        bootstrap_servers=kafka.bootstrap,
        partitions=3,
        linger_ms=2,
        topics=Topics.prefixed(f"b{uuid.uuid4().hex[:10]}"),
    )


def _config(
    tmp_path: Path, kafka: KafkaSettings, vinter: VinterSim, kaiko: KaikoSim, ops_port: int
) -> Path:
    kaiko.write_ca(tmp_path / "ca.pem")
    (tmp_path / "token").write_text(TOKEN)
    exchange, instrument_class, code = INSTRUMENT
    config = {
        "kafka": {
            "bootstrap_servers": kafka.bootstrap_servers,
            "partitions": 3,
            "linger_ms": 2,
            "topics": kafka.topics.model_dump(),
        },
        "vinter": {
            "ws_url": vinter.ws_url,
            "rest_url": vinter.base_url,
            "token": {"file": str(tmp_path / "token")},
            "api_key": {"env": "VINTER_API_KEY"},
            "symbols": [RT],
            "stale_after_s": 600,  # the test decides when the socket goes quiet
        },
        "kaiko": {
            "target": kaiko.target,
            "ca_file": str(tmp_path / "ca.pem"),
            "api_key": {"env": "KAIKO_API_KEY"},
            "subscriptions": [
                {"exchange": exchange, "instrument_class": instrument_class, "code": code}
            ],
            "stale_after_s": 600,
        },
        "settlement": {
            "symbols": [SETTLED],
            "backfill_days": 10,
            "interval_s": 0.3,  # one queued REST body per poll
            "window_start": "00:00",
            "window_end": "00:00",
        },
        "ops": {"host": "127.0.0.1", "port": ops_port},
        "log_level": "DEBUG",
        "shutdown_grace_s": 20,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


async def test_bad_input_end_to_end(broker_settings: KafkaSettings, tmp_path: Path) -> None:
    """Every malformed case through the real path: dead-lettered with its reason, counted,
    the valid records around it delivered, no secret anywhere, no crash."""
    bootstrap, topics = broker_settings.bootstrap_servers, broker_settings.topics
    expected: Letters = Counter()
    ops_port = free_port()
    async with (
        VinterSim([RT, SETTLED], token=TOKEN, api_key=API_KEY, history_days=5) as vinter,
        KaikoSim(api_key=KAIKO_KEY, instruments=[INSTRUMENT], aggregates=["1s"], rate=20) as kaiko,
    ):
        config = _config(tmp_path, broker_settings, vinter, kaiko, ops_port)
        proc = await start_bridge(config)
        try:
            base_url = f"http://127.0.0.1:{ops_port}"
            await wait_status(f"{base_url}/readyz", 200, timeout=60)
            await vinter.wait_sockets(1, RT, timeout=30)
            async with asyncio.timeout(30):
                await kaiko.wait_for_streams(1)

            # WebSocket: each case on the live socket, between two valid records
            base = vinter.append(RT)[0]
            for ws_case in ws_cases(base):
                assert vinter.send_raw(RT, ws_case.message) == 1
                vinter.append(RT)
                for raw in _ws_raws(ws_case.message):
                    _expect(expected, WS_SOURCE, ws_case.reason, raw)

            # REST, nav_daily: each bad body answers one settlement poll, then one good
            # envelope carries every bad daily record
            daily = vinter.history(SETTLED)[-1]
            bodies = body_cases(daily)
            records = daily_record_cases(daily)
            queue = vinter.rest_raw[Frequency.DAILY]
            queue += [b.body for b in bodies]
            queue.append(envelope([c.record for c in records], SETTLED))
            for body_case in bodies:
                _expect(expected, REST_SOURCE, body_case.reason, body_case.body)
            for record_case in records:
                raw = orjson.dumps(_parsed(record_case.record), option=orjson.OPT_SORT_KEYS)
                _expect(expected, SETTLEMENT_SOURCE, record_case.reason, raw)

            # gRPC: each case takes an interval's slot in the live stream
            exchange, instrument_class, instrument_code = INSTRUMENT
            vwap_base = {**DOC_VWAP, "exchange": exchange, "class": instrument_class}
            bad_vwap = vwap_cases({**vwap_base, "code": instrument_code})
            kaiko.inject(*(c.message for c in bad_vwap))
            for vwap_case in bad_vwap:
                text = text_format.MessageToString(vwap_case.message, as_one_line=True)
                _expect(expected, VWAP_SOURCE, vwap_case.reason, text.encode())

            # every valid record so far is in Kafka: the socket's mark is the last of them
            live = {r["timestamp"] for r in vinter.emitted(RT)}
            await read_topic(
                bootstrap,
                topics.nav_ticks,
                until=lambda rs: {v["data"]["timestamp"] for v in values(rs)} >= live,
                timeout=60,
            )

            # REST, nav_real_time: records appended while the socket is down come back by
            # the reconnect's back-fill: first a bad body, then bad records among them
            vinter.stall = True  # appended, not pushed: a gap only REST can fill
            gap = vinter.append(RT, 3)
            vinter.stall = False
            bad_body = b"<html><body>503 Service Unavailable</body></html>"
            backfill_cases = nav_record_cases(gap[0])
            vinter.rest_raw[Frequency.REAL_TIME] += [
                bad_body,
                envelope([gap[-1]], RT),  # the newest record: bounds the back-fill
                envelope([*gap, *(c.record for c in backfill_cases)], RT),
            ]
            _expect(expected, REST_SOURCE, "bad_body", bad_body)
            for record_case in backfill_cases:
                raw = orjson.dumps(_parsed(record_case.record))
                _expect(expected, REST_SOURCE, record_case.reason, raw)
            await vinter.drop_all()
            await wait_for(lambda: not vinter.rest_raw[Frequency.REAL_TIME], timeout=30)
            await vinter.wait_sockets(1, RT, timeout=30)
            vinter.append(RT, 2)  # and the socket goes on

            # every refusal is a dead letter with its reason and raw input, none more
            total = sum(expected.values())
            try:
                letters = await read_topic(bootstrap, topics.dlq, until=total, timeout=60, idle=1)
            except TimeoutError:
                letters = await read_topic(bootstrap, topics.dlq)  # what did come, for the diff
            found: Letters = Counter()
            for doc in values(letters):
                data = doc["data"]
                assert isinstance(data, dict)
                found[(data["source"], data["reason"], data["raw"], data["raw_encoding"])] += 1
            assert found == expected, _difference(found, expected)
            assert kaiko.injected_sent == len(bad_vwap)
            assert not vinter.rest_raw[Frequency.DAILY]

            # the valid records around the cases all arrived, each once
            emitted = sorted(r["timestamp"] for r in vinter.emitted(RT))
            nav = values(
                await read_topic(bootstrap, topics.nav_ticks, until=len(emitted), timeout=60)
            )
            assert sorted(_data(e)["timestamp"] for e in nav) == emitted
            kaiko.stall()
            sent = {r.uid for r in kaiko.sent}
            vwap = values(
                await read_topic(
                    bootstrap,
                    topics.vwap_ticks,
                    until=lambda rs: {_data(v)["uid"] for v in values(rs)} >= sent,
                    timeout=60,
                )
            )
            assert all(e["type"] == VWAP_TICK for e in vwap)  # no gap: the stream never broke
            dates = {r["date"] for r in vinter.history(SETTLED)}
            settled = values(
                await read_topic(bootstrap, topics.settlements, until=len(dates), timeout=60)
            )
            assert {_data(s)["date"] for s in settled} == dates

            # counted by the metric, per source and reason
            status, metrics_text = await get(f"{base_url}/metrics")
            assert status == 200
            counted: Counter[tuple[str, str]] = Counter()
            for family in text_string_to_metric_families(metrics_text):
                for sample in family.samples:
                    if sample.name == "bridge_dead_letters_total":
                        key = (sample.labels["source"], sample.labels["reason"])
                        counted[key] += int(sample.value)
            by_reason: Counter[tuple[str, str]] = Counter()
            for (source, reason, _, _), n in expected.items():
                by_reason[(source, reason)] += n
            assert counted == by_reason

            # no secret in dead letters, their headers, any topic's headers, or the metrics
            for record in letters:
                assert not _leaks(record.value or b"")
                assert not any(_leaks(v or b"") for _, v in record.headers)
            for topic in (topics.nav_ticks, topics.vwap_ticks, topics.settlements):
                for record in await read_topic(bootstrap, topic, timeout=30):
                    assert not any(_leaks(v or b"") for _, v in record.headers)
            assert not _leaks(metrics_text.encode())
        finally:
            code, output = await stop(proc, config)
    assert code == 0, output[-3000:]
    assert "stopped cleanly" in output
    assert not _leaks(output.encode()), "a secret is in the log (DEBUG level)"
    assert "Traceback" not in output, output[-3000:]
    assert "unexpected error" not in output, output[-3000:]


def _parsed(record: Any) -> Any:
    """A record as the bridge holds it after reading the JSON the simulator sent."""
    return orjson.loads(dumps(record))


def _data(doc: dict[str, object]) -> dict[str, Any]:
    data = doc["data"]
    assert isinstance(data, dict)
    return data


def _leaks(blob: bytes) -> bool:
    return any(secret.encode() in blob for secret in SECRETS)


def _difference(found: Letters, expected: Letters) -> str:
    missing, extra = expected - found, found - expected
    return f"missing {len(missing)}: {list(missing)[:5]}; extra {len(extra)}: {list(extra)[:5]}"
