"""The README's first command, as a person runs it: in a terminal, stopped with Ctrl-C."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EVENTS = re.compile(rb"kaiko-bridge demo: (\d+) events in Kafka")


def brokers() -> set[int]:
    found = subprocess.run(
        ["pgrep", "-f", "kafka.Kafka"], check=False, capture_output=True, text=True
    )
    return {int(pid) for pid in found.stdout.split()}


def read_until(fd: int, done: re.Pattern[bytes], timeout: float, seen: bytearray) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal closed: the program exited
            return bool(done.search(seen))
        if not chunk:
            return bool(done.search(seen))
        seen += chunk
        if done.search(seen):
            return True
    return False


ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")


def test_make_demo_shows_events_and_stops_cleanly_on_ctrl_c() -> None:
    """The README's first command under make, in an 80-column terminal: the screen names
    Kafka's address and the ops URL, and Ctrl-C ends every process without a traceback and
    make with exit code 0 (the demo takes the terminal's foreground for itself)."""
    before = brokers()
    pid, fd = pty.fork()
    if pid == 0:  # the child: make, in a real terminal (the venv is set up already)
        os.chdir(ROOT)
        os.execvp("make", ["make", "-s", "-o", ".venv/.installed", "demo"])  # noqa: S606
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 80, 0, 0))
    seen = bytearray()
    try:
        flowing = re.compile(rb"kaiko-bridge demo: [1-9]\d* events in Kafka")
        assert read_until(fd, flowing, 120, seen), seen[-2000:].decode(errors="replace")
        assert read_until(fd, re.compile(rb"Ctrl-C stops the demo"), 30, seen)
        # what the screen says to run, in another terminal, while the demo runs
        command = re.search(rb"read it: (\S+) replay TOPIC --bootstrap (\S+) -f json", seen)
        assert command is not None
        read = subprocess.run(
            [
                str(ROOT / command.group(1).decode()),
                *("replay", "vinter.nav.ticks", "--bootstrap", command.group(2).decode()),
                *("-f", "json", "--count", "3"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert read.returncode == 0, read.stderr
        docs = [json.loads(line) for line in read.stdout.splitlines()]
        assert len(docs) == 3
        assert {doc["value"]["type"] for doc in docs} == {"vinter.nav.tick"}
        os.write(fd, b"\x03")  # Ctrl-C, through the terminal driver: SIGINT
        assert read_until(fd, re.compile(rb"stopped cleanly"), 60, seen), seen[-2000:]
        deadline = time.monotonic() + 30
        status = None
        while time.monotonic() < deadline:
            waited, status = os.waitpid(pid, os.WNOHANG)
            if waited:
                break
            time.sleep(0.1)
        assert status is not None
        assert os.waitstatus_to_exitcode(status) == 0, seen[-3000:].decode(errors="replace")
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    text = bytes(seen)
    counts = [int(n) for n in EVENTS.findall(text)]
    assert counts
    assert max(counts) > 0
    assert brokers() <= before, "the demo left a Kafka broker running"
    assert b"Traceback" not in text
    assert b"Interrupt" not in text  # make's own report of a SIGINT
    assert b"first run only" not in text  # Kafka was fetched before
    screens = [ANSI.sub(b"", screen) for screen in re.split(rb"\x1b\[H\x1b\[2J", text)]
    screen = next(s for s in reversed(screens) if EVENTS.search(s)).decode()
    assert re.search(r"Kafka 127\.0\.0\.1:\d+ \(up\)   ops http://127\.0\.0\.1:\d+/metrics", screen)
    assert "accelerated time" in screen
    assert "malformed on purpose" in screen
    # while it ran, the freshness rows said each subscription was held here and fresh
    fresh = re.compile(rb"nav +vnfa-\S+ +(connected|backfilling) +[\d.]+s")
    assert any(fresh.search(s) for s in screens), screen
    for line in screen.replace("\r", "").splitlines():
        assert len(line) <= 80, line
