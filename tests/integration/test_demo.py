"""The README's first command, as a person runs it: in a terminal, stopped with Ctrl-C."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

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


def test_demo_shows_events_and_stops_cleanly_on_ctrl_c() -> None:
    before = brokers()
    pid, fd = pty.fork()
    if pid == 0:  # the child: the demo, in a real terminal
        os.execv(sys.executable, [sys.executable, "-m", "bridge.cli", "demo"])  # noqa: S606
    seen = bytearray()
    try:
        flowing = re.compile(rb"kaiko-bridge demo: [1-9]\d* events in Kafka")
        assert read_until(fd, flowing, 90, seen), seen[-2000:].decode(errors="replace")
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
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)
    counts = [int(n) for n in EVENTS.findall(bytes(seen))]
    assert counts
    assert max(counts) > 0
    assert brokers() <= before, "the demo left a Kafka broker running"
