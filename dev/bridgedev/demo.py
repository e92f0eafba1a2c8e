"""`kaiko-bridge demo`: a real local Kafka, simulated Vinter and Kaiko upstreams, the bridge
with `config/demo.yaml`, and a live view of what lands in Kafka. Ctrl-C stops it all.

It runs from a checkout of the source (it needs `config/demo.yaml` and `tools/kafka`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
from pydantic import SecretStr

from bridge import logs, metrics
from bridge.app import Bridge, secrets_of
from bridge.config import Settings
from bridge.configfile import load_settings
from bridge.freshness import BOARD
from bridge.kafka import new_consumer
from bridge.loop import run_loop

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "config" / "demo.yaml"
REFRESH_S = 1.0
WIDTH = 80
#: Every how many NAV messages the simulator sends a malformed one, to show dead letters.
MALFORMED_EVERY = 40


class LiveView:
    """Counts events per topic and key from Kafka and draws a small table."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.counts: Counter[tuple[str, str]] = Counter()
        self.last: dict[tuple[str, str], str] = {}
        self.dead: Counter[str] = Counter()
        self.total = 0
        self.started = time.monotonic()

    def _describe(self, doc: dict[str, Any]) -> str:
        data = doc.get("data") or {}
        kind = doc.get("type", "?")
        if kind == "vinter.nav.tick":
            value = data.get("close") if data.get("value") is None else data.get("value")
            return f"{value} @ {doc.get('time')}"
        if kind == "kaiko.vwap.tick":
            return f"{data.get('price', 0):.4f} {data.get('aggregate')} {data.get('uid')}"
        if kind == "vinter.nav.settlement":
            return f"{data.get('date')} close {data.get('close')} rev {data.get('revision')}"
        if kind == "bridge.gap":
            return f"gap after {data.get('last_before')} -> {data.get('first_after')}"
        return str(kind)

    async def follow(self) -> None:
        topics = self._settings.kafka.topics
        consumer = new_consumer(
            self._settings.kafka,
            topics.nav_ticks,
            topics.vwap_ticks,
            topics.settlements,
            topics.dlq,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        try:
            await consumer.start()
            async for record in consumer:
                self.total += 1
                doc = orjson.loads(record.value or b"{}")
                key = (record.key or b"").decode()
                if record.topic == topics.dlq:
                    self.dead[(doc.get("data") or {}).get("reason", "?")] += 1
                    continue
                self.counts[(record.topic, key)] += 1
                self.last[(record.topic, key)] = self._describe(doc)
        finally:
            await consumer.stop()

    def render(self, bridge: Bridge) -> str:
        """The screen, at most `WIDTH` columns wide."""
        ok, detail = bridge.ready()
        elapsed = time.monotonic() - self.started
        reconnects = sum(
            sample.value
            for metric in metrics.RECONNECTS.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
        ops = f"http://127.0.0.1:{bridge.ops.port}" if bridge.ops is not None else "-"
        bootstrap = self._settings.kafka.bootstrap_servers
        lines = [
            f"kaiko-bridge demo: {self.total} events in Kafka after {elapsed:.0f}s, "
            f"ready: {'yes' if ok else 'no'}, reconnects: {reconnects:.0f}",
            f"Kafka {bootstrap} ({detail['kafka']})   ops {ops}/metrics  /readyz",
            f"read it: .venv/bin/kaiko-bridge replay TOPIC --bootstrap {bootstrap} -f json",
            "The simulated upstreams run in accelerated time: their dates run ahead of the",
            f"clock. Every {MALFORMED_EVERY}th NAV message is malformed on purpose: see the "
            "dead letters.",
            "",
            f"{'topic':<23}{'key':<22}{'events':>7}  last",
        ]
        per_topic: dict[str, list[tuple[str, int]]] = defaultdict(list)
        for (topic, key), count in sorted(self.counts.items()):
            per_topic[topic].append((key, count))
        for topic, rows in per_topic.items():
            for key, count in rows:
                last = self.last[(topic, key)]
                lines.append(f"{topic[:22]:<23}{key[:21]:<22}{count:>7}  {last}")
        lines += ["", *freshness_lines()]
        dead = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dead.items())) or "none"
        lines += ["", f"dead letters ({self._settings.kafka.topics.dlq}): {dead}"]
        lines += ["", "Ctrl-C stops the demo."]
        return "\n".join(line[:WIDTH] for line in lines)


def freshness_lines() -> list[str]:
    """Each subscription's state, the age of its newest publication and that record's lag
    behind its own timestamp, as `/metrics` has them (bridge_subscription_*)."""
    now = time.time()
    states = BOARD.states()
    lines = [f"{'feed':<11}{'subscription':<32}{'state':<12}{'age':>8}{'lag':>9}"]
    for row in sorted(BOARD.rows(), key=lambda r: (r.feed, r.subscription)):
        age = "-" if row.published_at is None else f"{now - row.published_at:.1f}s"
        lag = "-" if row.lag_s is None else _short(row.lag_s)
        state = states[(row.feed, row.subscription)]
        lines.append(f"{row.feed:<11}{row.subscription[:31]:<32}{state:<12}{age:>8}{lag:>9}")
    return lines


def _short(seconds: float) -> str:
    """A lag in the unit that fits (the simulated daily dates run far ahead or behind)."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0)):
        if abs(seconds) >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.1f}s"


async def _demo(bootstrap: str, seconds: float | None, workdir: Path) -> int:
    from bridgedev.sim.kaiko import KaikoSim
    from bridgedev.sim.vinter import VinterSim

    base = load_settings(DEMO_CONFIG)
    token, api_key, kaiko_key = (secrets.token_urlsafe(16) for _ in range(3))
    symbols = sorted({*base.vinter.symbols, *base.settlement.symbols})
    async with (
        VinterSim(symbols, token=token, api_key=api_key, rate=2.0, history_days=30) as vinter,
        KaikoSim(api_key=kaiko_key, rate=5.0) as kaiko,
    ):
        vinter.malformed_every = MALFORMED_EVERY  # bad input, to show the dead-letter topic
        ca_file = workdir / "kaiko-ca.pem"
        kaiko.write_ca(ca_file)
        settings = base.model_copy(
            update={
                "kafka": base.kafka.model_copy(update={"bootstrap_servers": bootstrap}),
                "vinter": base.vinter.model_copy(
                    update={
                        "ws_url": vinter.ws_url,
                        "rest_url": vinter.base_url,
                        "token": SecretStr(token),
                        "api_key": SecretStr(api_key),
                    }
                ),
                "kaiko": base.kaiko.model_copy(
                    update={
                        "target": kaiko.target,
                        "ca_file": ca_file,
                        "api_key": SecretStr(kaiko_key),
                    }
                ),
            }
        )
        logs.configure("WARNING", "text", secrets_of(settings))
        # The live view shows Kafka's health; aiokafka's own retry chatter would only scroll it.
        logging.getLogger("aiokafka").setLevel(logging.CRITICAL)
        bridge = Bridge(settings, ops_port=0)
        view = LiveView(settings)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
        runner = asyncio.create_task(bridge.run(stop))
        started = asyncio.create_task(bridge.started.wait())
        await asyncio.wait([runner, started], return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        follower = asyncio.create_task(view.follow())  # the bridge has created the topics
        deadline = None if seconds is None else time.monotonic() + seconds
        tty = sys.stdout.isatty()
        try:
            while not stop.is_set() and not runner.done():
                if deadline is not None and time.monotonic() >= deadline:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), REFRESH_S)
                screen = view.render(bridge)
                print(("\x1b[H\x1b[2J" + screen) if tty else screen + "\n", flush=True)
        finally:
            stop.set()
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
            await runner
        print(f"\nstopped cleanly: {view.total} events were in Kafka", flush=True)
        return 0


@contextlib.contextmanager
def own_terminal() -> Iterator[None]:
    """Ctrl-C for the demo alone: in a process group of its own, in the terminal's
    foreground, so a `make` that started it gets no SIGINT and ends cleanly with it."""
    try:
        fd = sys.stdin.fileno()
        before = os.tcgetpgrp(fd) if os.isatty(fd) else None
    except (OSError, ValueError):
        before = None
    if before is None or os.getpgid(0) == os.getpid():  # no terminal, or a shell's job
        yield
        return
    ignored = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a background group may not
    try:  # change the foreground one without it
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, before)
        signal.signal(signal.SIGTTOU, ignored)


def run_demo(seconds: float | None = None) -> int:
    from bridgedev import localkafka

    if not DEMO_CONFIG.is_file() or not localkafka.pom_path().is_file():
        print(
            f"kaiko-bridge demo needs {DEMO_CONFIG} and tools/kafka of a full checkout: "
            "run `make demo` in the repository",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(level=logging.WARNING)
    if not localkafka.is_fetched():
        print("fetching Apache Kafka (first run only) ...", flush=True)
    localkafka.fetch()
    print("starting a local Kafka broker ...", flush=True)
    with (
        own_terminal(),
        localkafka.LocalKafka() as broker,
        tempfile.TemporaryDirectory(prefix="kaiko-demo-") as tmp,
    ):
        print(f"Kafka ready at {broker.bootstrap}; starting simulators and the bridge", flush=True)
        try:
            return run_loop(_demo(broker.bootstrap, seconds, Path(tmp)))
        except KeyboardInterrupt:
            return 0
