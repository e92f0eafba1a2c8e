"""The receiver worker with VWAP streams: the child's lifetime, its secrets, its bad bytes,
its flow control.

Real processes, a real gRPC server over TLS on loopback and a real broker.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import sys
import textwrap
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from kaikosdk.stream.aggregates_vwap_v1 import response_pb2

from bridge.config import KafkaSettings, KaikoSettings
from bridge.normalize.vwap import interval_mark
from bridge.publish import Publisher
from bridge.sources.vwap_grpc import VwapSource, channel_options, subscribe_request
from bridge.sources.vwap_receiver import METHOD, Job, vwap_worker
from bridge.sources.worker import Ended
from bridge.state import MarkBook
from bridgedev.sim.kaiko import KaikoSim
from bridgedev.sim.tls import TestCA
from tests.integration import test_vwap_source
from tests.integration.test_vwap_source import (
    API_KEY,
    INSTRUMENTS,
    WILDCARD,
    by_type,
    kaiko_settings,
    read_vwap,
    running,
    tick_id,
)
from tests.kafkautil import read_topic, values, wait_for
from tests.malformed import DOC_TS_EVENT, DOC_VWAP, vwap_message

pytestmark = pytest.mark.integration
sim = test_vwap_source.sim  # the same simulator fixture


_parse = response_pb2.StreamAggregatesVWAPResponseV1.FromString


def wildcard_job(gateway: KaikoSim) -> Job:
    """The receiver's job for the `WILDCARD` subscription on `gateway`."""
    request = subscribe_request(WILDCARD).SerializeToString()
    options = channel_options(WILDCARD.aggregate)
    return Job(gateway.target, API_KEY, gateway.ca_pem, request, options)


def children_of(pid: int) -> list[int]:
    """Live child processes of `pid` (from /proc)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:
                continue
            if int(stat.rpartition(")")[2].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def receivers_of(pid: int) -> list[int]:
    return [
        child
        for child in children_of(pid)
        if b"bridge.sources.vwap_receiver" in _read(f"/proc/{child}/cmdline")
    ]


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError:
        return b""


def gone(pid: int) -> Callable[[], bool]:
    def check() -> bool:
        stat = _read(f"/proc/{pid}/stat")
        return not stat or stat.rpartition(b")")[2].split()[0] == b"Z"

    return check


def test_job_line_round_trips_and_its_repr_hides_the_key() -> None:
    job = Job("127.0.0.1:1", "SENTINEL-key", b"-----PEM-----\n", b"\x0a\x02\x31\x73", (("a", 1),))
    assert Job.from_spec(orjson.loads(orjson.dumps(job.to_spec()))) == job
    assert "SENTINEL" not in repr(job)


async def test_receiver_holds_the_key_on_stdin_only_and_stops_with_the_source(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    sentinel = API_KEY  # the simulator accepts only this key, so it is the one in use
    async with Publisher(kafka_settings) as publisher:
        settings = kaiko_settings(sim, tmp_path)
        source = VwapSource(WILDCARD, settings, publisher, MarkBook("t"))
        async with running(source):
            await wait_for(lambda: publisher.published >= 20, timeout=20)
            (child,) = receivers_of(os.getpid())
            assert sentinel.encode() not in _read(f"/proc/{child}/cmdline")
            assert sentinel.encode() not in _read(f"/proc/{child}/environ")
        await wait_for(gone(child), timeout=10)
    assert sim.streams[0].status == grpc.StatusCode.CANCELLED  # it hung up, cleanly


async def test_killed_receiver_is_replaced_and_reported_as_a_gap(
    kafka_settings: KafkaSettings, sim: KaikoSim, tmp_path: Path
) -> None:
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, kaiko_settings(sim, tmp_path), publisher, MarkBook(topic))
        async with running(source) as state:
            await wait_for(lambda: publisher.published >= 60, timeout=20)
            (child,) = receivers_of(os.getpid())
            os.kill(child, signal.SIGKILL)
            await wait_for(lambda: len(sim.streams) >= 2 and len(sim.streams[1].sent) >= 60)
            sim.stall()
            second = {tick_id(r) for r in sim.streams[1].sent}

            def complete(records: Any) -> bool:
                return second <= {doc["id"] for doc in values(records)}

            docs = values(await read_topic(kafka_settings.bootstrap_servers, topic, until=complete))
            assert "receiver exited with code -9" in state.last_error
    assert source.sessions == 2
    ids = [d["id"] for d in docs]
    assert len(ids) == len(set(ids)), "no duplicates"
    assert len(by_type(docs, "bridge.gap")) == len(INSTRUMENTS) == source.gaps
    # every tick was sent; the first stream's last ones, still in the killed receiver, may
    # be lost (the gap events say so)
    sent = {tick_id(r) for stream in sim.streams for r in stream.sent}
    assert {d["id"] for d in by_type(docs, "kaiko.vwap.tick")} <= sent


async def test_receiver_exits_when_its_parent_is_killed(sim: KaikoSim, tmp_path: Path) -> None:
    settings = kaiko_settings(sim, tmp_path)
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from bridge.config import VwapSubscription
        from bridge.sources.vwap_grpc import subscribe_request
        from bridge.sources.vwap_receiver import Job, vwap_worker

        async def main():
            ca = Path({str(settings.ca_file)!r}).read_bytes()
            sub = VwapSubscription.model_validate({WILDCARD.model_dump()!r})
            request = subscribe_request(sub).SerializeToString()
            job = Job({settings.target!r}, {API_KEY!r}, ca, request, ())
            async with vwap_worker() as worker:
                stream = await worker.open(job.to_spec())
                await stream.read()
                print("receiving", flush=True)
                await asyncio.sleep(3600)

        asyncio.run(main())
        """
    )
    parent = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), timeout=30)
        assert line == b"receiving\n"
        (child,) = receivers_of(parent.pid)
        parent.kill()
        await parent.wait()
        await wait_for(gone(child), timeout=10)
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()


async def test_a_receiver_whose_call_ended_exits_cleanly_on_its_own(sim: KaikoSim) -> None:
    """After it reports how its call ended, the child exits with code 0 by itself: not
    aborted by the interpreter for a thread stuck in stdin, not killed after the grace."""
    received = 0
    async with vwap_worker() as worker:
        stream = await worker.open(wildcard_job(sim).to_spec())
        ended: Ended | None = None
        while ended is None:
            try:
                received += len(await stream.read())
            except Ended as exc:
                ended = exc
            if received >= 20:
                sim.abort_next(grpc.StatusCode.UNAVAILABLE)
        assert ended.report is not None
        assert ended.report["code"] == "UNAVAILABLE"
        await wait_for(lambda: bool(worker.exit_codes), timeout=10)
    assert list(worker.exit_codes) == [0]


# -- a gateway that sends bytes which are not a VWAP response ------------------------------


def _tick(uid: str) -> bytes:
    message = vwap_message({**DOC_VWAP, "uid": uid}, DOC_TS_EVENT)
    data: bytes = message.SerializeToString()
    return data


@pytest.fixture
async def garbling_gateway() -> AsyncIterator[tuple[str, TestCA]]:
    """A TLS gRPC server whose Subscribe sends a tick, undecodable bytes, then a tick."""
    ca = TestCA()

    async def subscribe(_request: bytes, context: Any) -> AsyncIterator[bytes]:
        for frame in (
            _tick("2024-08-09T13:47:19Z"),
            b"\xff\xff\xff\xff",
            _tick("2024-08-09T13:47:20Z"),
        ):
            yield frame
        await context.abort(grpc.StatusCode.UNAVAILABLE, "that is all")

    service, _, method = METHOD.rpartition("/")
    handler = grpc.method_handlers_generic_handler(
        service.strip("/"), {method: grpc.unary_stream_rpc_method_handler(subscribe)}
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(ca.server_key_pem, ca.server_cert_chain_pem)])
    )
    await server.start()
    try:
        yield f"127.0.0.1:{port}", ca
    finally:
        await server.stop(None)


async def test_undecodable_bytes_are_dead_lettered_and_the_stream_goes_on(
    kafka_settings: KafkaSettings, garbling_gateway: tuple[str, TestCA], tmp_path: Path
) -> None:
    target, ca = garbling_gateway
    settings = KaikoSettings(
        target=target, api_key=API_KEY, ca_file=ca.write_ca(tmp_path / "ca.pem"), stale_after_s=20
    )
    topic = kafka_settings.topics.vwap_ticks
    async with Publisher(kafka_settings) as publisher:
        source = VwapSource(WILDCARD, settings, publisher, MarkBook(topic))
        async with running(source) as state:
            await wait_for(lambda: state.attempts >= 1 and "UNAVAILABLE" in state.last_error)
            await wait_for(lambda: publisher.pending == 0)
    assert source.bad_records == 1
    ticks = by_type(values(await read_vwap(kafka_settings, 2)), "kaiko.vwap.tick")
    assert [t["data"]["uid"] for t in ticks][:2] == ["2024-08-09T13:47:19Z", "2024-08-09T13:47:20Z"]
    bootstrap, dlq = kafka_settings.bootstrap_servers, kafka_settings.topics.dlq
    (dead,) = values(await read_topic(bootstrap, dlq, until=1, idle=0.5))
    assert dead["data"]["reason"] == "undecodable"
    assert dead["data"]["source"] == source.name
    assert dead["data"]["raw_encoding"] == "base64"
    assert base64.b64decode(dead["data"]["raw"]) == b"\xff\xff\xff\xff"


# -- pushback -------------------------------------------------------------------------------


def steady(read: Callable[[], int], for_s: float = 1.0) -> Callable[[], bool]:
    """A condition: `read()` has not changed for `for_s` seconds."""
    last = [read(), time.monotonic()]

    def check() -> bool:
        now = read()
        if now != last[0]:
            last[:] = [now, time.monotonic()]
            return False
        return time.monotonic() - last[1] >= for_s

    return check


async def test_a_receiver_not_read_holds_the_gateway_back_and_loses_nothing() -> None:
    """The source not reading its channel makes the worker pause it, which stops the child's
    reads of the stream, and HTTP/2 flow control stops the gateway; reading again, every
    response arrives, in order."""
    async with KaikoSim(
        api_key=API_KEY, instruments=INSTRUMENTS, aggregates=("1s",), rate=0, record=False
    ) as gateway:  # as fast as it can
        starts: dict[str, list[int]] = defaultdict(list)  # interval starts per instrument

        def take(batch: list[Any]) -> None:
            for payload, _at in batch:
                key, start_ns = interval_mark(_parse(payload))
                starts[key].append(start_ns)

        async with vwap_worker() as worker:
            stream = await worker.open(wildcard_job(gateway).to_spec())
            take(await stream.read())
            # not read: the gateway comes to a stop, where it would send ~10k messages a second
            await wait_for(steady(lambda: gateway.messages_sent), timeout=60)
            assert stream.paused  # the worker told the child to stop reading
            held = gateway.messages_sent
            async with asyncio.timeout(60):
                while sum(map(len, starts.values())) < held:
                    take(await stream.read())
    assert gateway.messages_sent > held, "the stream went on once read again"
    assert len(starts) == len(INSTRUMENTS)
    second = 10**9  # the 1s aggregate
    for key, seen in starts.items():
        assert seen == list(range(seen[0], seen[0] + len(seen) * second, second)), key
