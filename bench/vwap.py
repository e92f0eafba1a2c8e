"""Throughput and latency of the Kaiko VWAP path: simulator -> gRPC -> bridge -> Kafka ack.

One run measures, each stage in a fresh child process against the same simulator and broker:

  (a) gRPC receive alone (msgs/s): asyncio with `async for` and `read()`, uvloop with
      `read()`, uvloop with the channel options `VwapSource` uses, and the blocking
      channel its receiver child reads with (bytes, not parsed: the bridge parses);
  (b) a naive pipeline: grpc.aio -> MessageToDict -> json.dumps -> aiokafka send per event;
  (c) `VwapSource` + `Publisher` end to end (events/s acknowledged by Kafka), asyncio and
      uvloop;
  (d) p50/p99 receive -> ack latency of (c) at a paced rate (default 3k events/s), in
      `--latency-rounds` rounds: the one in which the host stole least CPU time from this
      machine (steal, from /proc/stat) is kept, every round in the raw result;
  (e) raw aiokafka: `send()` of the same events pre-serialized, futures gathered, with the
      bridge's producer settings (the Kafka client's own ceiling); and its send -> ack
      latency at the paced rate of (d), the floor under (d) on this broker and machine;
  (f) that paced latency again while another process receives the paced stream of (d), as
      the bridge's receiver child does: the floor under (d) with (d)'s upstream load on the
      same two cores (the simulator and gRPC's receive), in a round beside each of (d).

Next to each rate: the CPU time of the whole process (all threads, gRPC's included, and
for (c) the source's receiver child) per event, which moves less than the rate when other
work shares the machine, and the peak RSS of the stage's processes. Stages run in
`--rounds` interleaved rounds and keep their best.

The simulator (`python -m bridgedev.sim.kaiko`, rate 0 = as fast as possible) runs as its own
process at raised priority, like a remote gateway (`benchlib.upstream` says why). Kafka is
a local broker started here (`LocalKafka`) unless `--bootstrap` names one.

    python bench/vwap.py                      # ~5 minutes
    python bench/vwap.py --messages 200000 --rounds 3 --bootstrap 127.0.0.1:9092
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import (
    LATENCY_KEYS,
    Samples,
    children,
    cpu_s,
    cpu_ticks,
    finish,
    kafka,
    latency_ms,
    least_disturbed,
    peak_rss_mb,
    raw_aiokafka,
    raw_paced,
    scenario,
    steal_pct,
    target,
    upstream,
)

REPO = Path(__file__).resolve().parent.parent
WARMUP = 5_000
SUBSCRIPTION = ("*", "spot", "*", "1s")  # the simulator's 3 default instruments


# -- shared helpers (child processes) ----------------------------------------------------------


def _request() -> Any:
    from bridge.config import VwapSubscription
    from bridge.sources.vwap_grpc import subscribe_request

    exchange, instrument_class, code, aggregate = SUBSCRIPTION
    return subscribe_request(
        VwapSubscription(
            exchange=exchange, instrument_class=instrument_class, code=code, aggregate=aggregate
        )
    )


def _channel(args: argparse.Namespace, *, tuned: bool = False) -> Any:
    """A channel with gRPC's defaults, or with the options VwapSource uses."""
    import grpc

    from bridge.sources.vwap_grpc import channel_options

    creds = grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=Path(args.ca).read_bytes()),
        grpc.access_token_call_credentials(os.environ["KAIKO_API_KEY"]),
    )
    options = channel_options(SUBSCRIPTION[3]) if tuned else ()
    return grpc.aio.secure_channel(args.target, creds, options=options)


class _Window:
    """Times `n` events after a warm-up of `WARMUP`: steady state, not connection set-up."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.count = 0
        self.started = 0.0
        self.elapsed = 0.0
        self.done = asyncio.Event()

    def hit(self, k: int = 1) -> None:
        self.count += k
        if self.count >= WARMUP and not self.started:
            self.started = time.perf_counter()
            self._cpu = cpu_s(children())
            self._base = self.count
        elif self.started and not self.done.is_set() and self.count - self._base >= self.n:
            self.elapsed = time.perf_counter() - self.started
            self.cpu = cpu_s(children()) - self._cpu
            self.rss = peak_rss_mb(children())  # while the receiver lives
            self.done.set()

    def result(self) -> dict[str, float]:
        """Events per second, CPU microseconds (all threads of this process and of its
        children, the source's gRPC receiver) per event, and the peak RSS of them all."""
        n = self.count - self._base
        return {"rate": n / self.elapsed, "cpu_us": self.cpu / n * 1e6, "rss_mb": self.rss}


def _kafka_settings(args: argparse.Namespace) -> Any:
    from bridge.config import KafkaSettings, Topics

    return KafkaSettings(
        bootstrap_servers=args.bootstrap,
        partitions=3,
        topics=Topics.prefixed(f"bench{uuid.uuid4().hex[:8]}"),
    )


# -- stages --------------------------------------------------------------------------------


def _receive_blocking(args: argparse.Namespace, window: _Window) -> None:
    """(a) as the source's receiver child reads: its blocking channel, bytes not parsed."""
    from bridge.sources.vwap_grpc import channel_options
    from bridge.sources.vwap_receiver import METHOD, secure_channel

    ca = Path(args.ca).read_bytes()
    options = channel_options(SUBSCRIPTION[3])
    with secure_channel(args.target, os.environ["KAIKO_API_KEY"], ca, options) as channel:
        call = channel.unary_stream(METHOD)(_request().SerializeToString())
        for _msg in call:
            window.hit()
            if window.done.is_set():
                break
        call.cancel()


async def stage_receive(args: argparse.Namespace) -> dict[str, Any]:
    """(a) gRPC receive alone: deserialize (but `blocking`) and drop."""
    import grpc
    from kaikosdk import sdk_pb2_grpc

    window = _Window(args.messages)
    if args.style == "blocking":
        _receive_blocking(args, window)
        return window.result()
    async with _channel(args, tuned=args.style == "tuned") as channel:
        call = sdk_pb2_grpc.StreamAggregatesVWAPServiceV1Stub(channel).Subscribe(_request())
        if args.style == "aiter":
            async for _msg in call:
                window.hit()
                if window.done.is_set():
                    break
        else:
            read, eof = call.read, grpc.aio.EOF
            while not window.done.is_set():
                if await read() is eof:
                    break
                window.hit()
        call.cancel()
    return window.result()


async def stage_naive(args: argparse.Namespace) -> dict[str, Any]:
    """(b) The obvious pipeline: MessageToDict, json.dumps, one aiokafka send per event."""
    from aiokafka import AIOKafkaProducer
    from google.protobuf.json_format import MessageToDict
    from kaikosdk import sdk_pb2_grpc

    from bridge.kafka import ensure_topics

    settings = _kafka_settings(args)
    await ensure_topics(settings)
    topic = settings.topics.vwap_ticks
    producer = AIOKafkaProducer(bootstrap_servers=args.bootstrap, linger_ms=5)
    await producer.start()
    window = _Window(args.messages)

    def acked(_future: Any) -> None:
        window.hit()

    try:
        async with _channel(args) as channel:
            call = sdk_pb2_grpc.StreamAggregatesVWAPServiceV1Stub(channel).Subscribe(_request())
            async for msg in call:
                doc = MessageToDict(msg, preserving_proto_field_name=True)
                key = f"{doc['exchange']}:{doc['class']}:{doc['code']}"
                envelope = {
                    "specversion": "1.0",
                    "id": f"vwap:{key}:{doc['aggregate']}:{doc['uid']}",
                    "source": "/kaiko/vwap",
                    "type": "kaiko.vwap.tick",
                    "time": doc.get("ts_event"),
                    "subject": key,
                    "data": doc,
                }
                value = json.dumps(envelope).encode()
                future = await producer.send(topic, value, key=key.encode())
                future.add_done_callback(acked)
                if window.done.is_set():
                    break
            call.cancel()
    finally:
        await producer.stop()
    return window.result()


async def _payloads(args: argparse.Namespace, n: int) -> list[tuple[bytes, bytes]]:
    """`n` of the simulator's messages as the bridge would publish them: (key, value)."""
    import grpc
    from kaikosdk import sdk_pb2_grpc

    from bridge.normalize.vwap import tick_and_mark

    payloads: list[tuple[bytes, bytes]] = []
    async with _channel(args) as channel:
        call = sdk_pb2_grpc.StreamAggregatesVWAPServiceV1Stub(channel).Subscribe(_request())
        read, eof = call.read, grpc.aio.EOF
        while len(payloads) < n:
            msg = await read()
            if msg is eof:
                break
            event, _key, _mark = tick_and_mark(msg)
            payloads.append((event.key.encode(), event.to_json()))
        call.cancel()
    return payloads


async def stage_raw(args: argparse.Namespace) -> dict[str, Any]:
    """(e) raw aiokafka: the simulator's messages normalized and serialized up front (not
    timed), then sent with the bridge's producer settings and futures gathered."""
    from bridge.kafka import ensure_topics

    payloads = await _payloads(args, args.messages)
    settings = _kafka_settings(args)
    await ensure_topics(settings)
    await raw_aiokafka(settings, payloads[:WARMUP])
    cpu0 = cpu_s()
    rate = await raw_aiokafka(settings, payloads)
    return {
        "rate": rate,
        "cpu_us": (cpu_s() - cpu0) / len(payloads) * 1e6,
        "rss_mb": peak_rss_mb(),
    }


async def _run_source(args: argparse.Namespace, on_ack: Callable[[int], bool]) -> None:
    """Run one VwapSource session with a Publisher while `on_ack(acknowledged)` is true."""
    from bridge.config import KaikoSettings, VwapSubscription
    from bridge.publish import Publisher
    from bridge.sources.vwap_grpc import VwapSource
    from bridge.state import MarkBook
    from bridge.supervisor import Progress

    settings = _kafka_settings(args)
    exchange, instrument_class, code, aggregate = SUBSCRIPTION
    kaiko = KaikoSettings(
        target=args.target,
        api_key=os.environ["KAIKO_API_KEY"],
        ca_file=Path(args.ca),
        stale_after_s=30,
    )
    subscription = VwapSubscription(
        exchange=exchange, instrument_class=instrument_class, code=code, aggregate=aggregate
    )
    async with Publisher(settings) as publisher:
        book = MarkBook(settings.topics.vwap_ticks)
        source = VwapSource(subscription, kaiko, publisher, book)
        task = asyncio.create_task(source.session(Progress()))
        try:
            # Polls: the publisher signals no event per acknowledgement.
            while not task.done() and on_ack(publisher.published):  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        error = task.exception() if task.done() and not task.cancelled() else None
        if error is not None:
            raise error


async def stage_source(args: argparse.Namespace) -> dict[str, Any]:
    """(c) VwapSource + Publisher: events acknowledged by Kafka per second."""
    window = _Window(args.messages)
    seen = 0

    def on_ack(published: int) -> bool:
        nonlocal seen
        window.hit(published - seen)
        seen = published
        return not window.done.is_set()

    await _run_source(args, on_ack)
    return window.result()


async def stage_latency(args: argparse.Namespace) -> dict[str, Any]:
    """(d) receive -> ack latency at a paced rate (the simulator paces the stream)."""
    from bridge import metrics

    recorder = Samples()
    samples = recorder.values
    metrics.LATENCY = recorder  # type: ignore[assignment]  # raw samples, not buckets
    began = time.perf_counter()
    skip, ticks = 0, cpu_ticks()

    def on_ack(published: int) -> bool:
        nonlocal skip, ticks
        if not skip and time.perf_counter() - began > 2.0:  # drop the warm-up
            skip, ticks = len(samples), cpu_ticks()
        return time.perf_counter() - began < float(args.seconds) + 2.0

    await _run_source(args, on_ack)
    kept = samples[skip:]
    return {**latency_ms(kept), "steal_pct": steal_pct(ticks), "rate": len(kept) / args.seconds}


async def stage_raw_paced(args: argparse.Namespace) -> dict[str, Any]:
    """(e) at the paced rate of (d): aiokafka's own send -> ack latency, the floor under (d)
    on this broker and machine."""
    from bridge.kafka import ensure_topics

    settings = _kafka_settings(args)
    await ensure_topics(settings)
    return await raw_paced(settings, await _payloads(args, 10_000), args.rate, args.seconds)


BRIDGE_STAGES = ("source", "latency")
"""The stages that run the bridge's own code, the rest being its baselines."""

STAGES = {
    "raw_paced": stage_raw_paced,
    "receive": stage_receive,
    "naive": stage_naive,
    "source": stage_source,
    "latency": stage_latency,
    "raw": stage_raw,
}


def child(args: argparse.Namespace) -> None:
    stage = STAGES[args.stage]
    if args.stage in BRIDGE_STAGES:
        from bridge.loop import settle_heap

        settle_heap()  # as the service's processes start (bridge.loop.run_loop)
    if args.loop == "uvloop":
        import uvloop

        result = uvloop.run(stage(args))
    else:
        result = asyncio.run(stage(args))
    print(json.dumps(result), flush=True)


# -- orchestration (parent process) ------------------------------------------------------


def _stop(proc: subprocess.Popen[Any]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def simulator(rate: float, api_key: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """A simulator process; yields (target, CA file)."""
    ca = workdir / f"ca-{rate:g}.pem"
    proc = subprocess.Popen(
        upstream([sys.executable, "-m", "bridgedev.sim.kaiko", "--port", "0", "--rate", str(rate),
                  "--aggregate", SUBSCRIPTION[3], "--ca-out", str(ca)]),
        stdout=subprocess.PIPE,
        env={**os.environ, "KAIKO_API_KEY": api_key},
        cwd=REPO,
        text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # "listening on HOST:PORT ca=..."
        if not line.startswith("listening on "):
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield line.split()[2], str(ca)
    finally:
        _stop(proc)


def _argv(stage: str, loop: str, **options: Any) -> list[str]:
    argv = [sys.executable, __file__, "--stage", stage, "--loop", loop]
    for name, value in options.items():
        argv += [f"--{name}", str(value)]
    return argv


def run_stage(stage: str, loop: str, env: dict[str, str], **options: Any) -> dict[str, Any]:
    argv = _argv(stage, loop, **options)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"stage {stage}/{loop} failed:\n{out.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def receiving(env: dict[str, str], **options: Any) -> Iterator[None]:
    """A gRPC receive of the simulator's stream in a process of its own while the block
    runs, as the bridge's receiver child does (f)."""
    options |= {"messages": 10**9, "style": "tuned"}  # until stopped
    proc = subprocess.Popen(
        _argv("receive", "uvloop", **options),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        _stop(proc)


THROUGHPUT = (
    (
        "a_asyncio_aiter",
        "receive",
        "asyncio",
        "aiter",
        "(a) gRPC receive alone, asyncio, async for",
    ),
    ("a_asyncio_read", "receive", "asyncio", "read", "(a) gRPC receive alone, asyncio, read()"),
    ("a_uvloop_read", "receive", "uvloop", "read", "(a) gRPC receive alone, uvloop, read()"),
    ("a_uvloop_tuned", "receive", "uvloop", "tuned", "(a) ... uvloop, read(), source's options"),
    (
        "a_blocking",
        "receive",
        "asyncio",
        "blocking",
        "(a) ... blocking, as the source's receiver reads",
    ),
    ("b", "naive", "asyncio", "aiter", "(b) naive pipeline, asyncio (to Kafka ack)"),
    ("e", "raw", "uvloop", "read", "(e) raw aiokafka send(), pre-serialized (to ack)"),
    ("c_asyncio", "source", "asyncio", "read", "(c) VwapSource + Publisher, asyncio (to ack)"),
    ("c", "source", "uvloop", "read", "(c) VwapSource + Publisher, uvloop (to ack)"),
)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every stage, in interleaved rounds; the best round of each, and (d)."""
    api_key = secrets.token_urlsafe(24)
    env = {**os.environ, "KAIKO_API_KEY": api_key, "PYTHONPATH": str(REPO)}
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp, kafka(args.bootstrap) as bootstrap:
        common: dict[str, Any] = {"bootstrap": bootstrap, "messages": args.messages}
        with simulator(0, api_key, Path(tmp)) as (address, ca):
            common |= {"target": address, "ca": ca}
            # Rounds interleave the stages, so a burst of load elsewhere on the machine
            # hits them alike; each stage keeps its best round.
            for _ in range(args.rounds):
                for name, stage, loop, style, _label in THROUGHPUT:
                    result = run_stage(stage, loop, env, style=style, **common)
                    if result["rate"] > best.get(name, {"rate": 0.0})["rate"]:
                        best[name] = result
            floor = run_stage(
                "raw_paced", "uvloop", env, **common, rate=args.rate, seconds=args.seconds
            )
        with simulator(args.rate, api_key, Path(tmp)) as (address, ca):
            common |= {"target": address, "ca": ca, "seconds": args.seconds}
            # A latency tail on a shared host owes much to the neighbours' moments (steal):
            # of a few rounds, the one the host disturbed least stands for the bridge.
            rounds, loaded = [], []
            for _ in range(args.latency_rounds):
                rounds.append(run_stage("latency", "uvloop", env, **common))
                with receiving(env, **common):
                    loaded.append(run_stage("raw_paced", "uvloop", env, **common, rate=args.rate))
    return {
        "stages": best,
        "latency": least_disturbed(rounds),
        "latency_rounds": rounds,
        "raw_paced": floor,
        "raw_paced_loaded": least_disturbed(loaded, prefix="raw_"),
        "raw_paced_loaded_rounds": loaded,
        "rounds": args.rounds,
    }


def scenarios(r: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    """The run as report rows (see `benchlib.scenario`), with the budget's targets."""
    best, lat = r["stages"], r["latency"]
    receive = max(v["rate"] for k, v in best.items() if k.startswith("a_"))
    baselines = {
        "naive pipeline": best["b"]["rate"],
        "raw aiokafka": best["e"]["rate"],
        "receive alone": receive,
    }
    e2e = best["c"]["rate"]
    rows = [
        scenario(
            "VWAP gRPC end to end (uvloop)",
            events_per_s=e2e,
            baselines=baselines,
            latency={"paced_per_s": lat["rate"]} | {k: lat[k] for k in LATENCY_KEYS},
            cpu_s_per_1k=best["c"]["cpu_us"] / 1000,
            peak_rss_mb=best["c"]["rss_mb"],
            targets=[
                target("x naive pipeline", e2e / baselines["naive pipeline"], 2.5, at_least=True),
                target("x receive alone", e2e / receive, 0.7, at_least=True),
                target(f"p99 ms at {args.rate:,.0f}/s", lat["p99_ms"], 20.0, at_least=False),
            ],
            details={"rounds": r["rounds"], "messages": args.messages},
        )
    ]

    def paced(floor: dict[str, float]) -> dict[str, float]:
        return {"paced_per_s": args.rate} | {k: floor[f"raw_{k}"] for k in LATENCY_KEYS}

    for name, _stage, _loop, _style, label in THROUGHPUT:
        if name == "c":
            continue
        stage = best[name]
        rows.append(
            scenario(
                f"  {label}",
                events_per_s=stage["rate"],
                latency=paced(r["raw_paced"]) if name == "e" else None,
                cpu_s_per_1k=stage["cpu_us"] / 1000,
                peak_rss_mb=stage["rss_mb"],
            )
        )
    rows.append(
        scenario(
            "  (f) raw aiokafka, paced, beside (d)'s receive",
            latency=paced(r["raw_paced_loaded"]),
        )
    )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bootstrap", help="use this Kafka instead of starting a local broker")
    p.add_argument("--messages", type=int, default=100_000, help="events timed per stage")
    p.add_argument("--rate", type=float, default=3000.0, help="paced rate for (d)")
    p.add_argument("--seconds", type=float, default=10.0, help="duration of (d)")
    p.add_argument("--rounds", type=int, default=2, help="rounds of (a)-(c); best kept")
    p.add_argument(
        "--latency-rounds",
        type=int,
        default=3,
        help="rounds of (d); the one with the least host steal kept",
    )
    # internal: a child process runs one stage
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    p.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help=argparse.SUPPRESS
    )
    p.add_argument(
        "--style", choices=("aiter", "read", "tuned", "blocking"), help=argparse.SUPPRESS
    )
    p.add_argument("--target", help=argparse.SUPPRESS)
    p.add_argument("--ca", help=argparse.SUPPRESS)
    p.add_argument("--json", help="also write the result to this file")
    args = p.parse_args()
    if args.stage:
        child(args)
    else:
        result = measure(args)
        finish(scenarios(result, args), result, args.json)


if __name__ == "__main__":
    main()
