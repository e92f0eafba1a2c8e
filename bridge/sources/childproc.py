"""The receiver worker's child processes, as processes: start one with piped stdio, log
what it writes to stderr (redacted, cut), and stop it. The worker (`worker.py`) speaks the
protocol over those pipes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import sys

log = logging.getLogger(__name__)

CLOSE_GRACE_S = 2.0
#: The longest stderr line the parent logs (the rest is cut).
MAX_STDERR_LINE = 2000
_TOKEN = re.compile(r"(token=)[^&\s\"'#]*", re.IGNORECASE)
#: The severity letter that starts a gRPC (absl) log line: `E1204 16:30:00.123 ...`. gRPC's
#: own lines are for debugging it (a call's failure reaches the bridge as its status): DEBUG,
#: but for a fatal one.
_ABSL = re.compile(r"^([IWEF])\d{4} ")
_LEVELS = {"I": logging.DEBUG, "W": logging.DEBUG, "E": logging.DEBUG, "F": logging.CRITICAL}
_stderr_tasks: set[asyncio.Task[None]] = set()


def redact(text: str) -> str:
    """`text` with the value of every `token=` query parameter blanked."""
    return _TOKEN.sub(r"\1***", text) if "token=" in text.lower() else text


async def spawn(module: str) -> asyncio.subprocess.Process:
    """Start `python -m module` with its stdin, stdout and stderr piped to us; its stderr
    lines are logged here (`relay_stderr`)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    if proc.stderr is not None:
        task = asyncio.create_task(relay_stderr(proc.stderr, module.rpartition(".")[2]))
        _stderr_tasks.add(task)
        task.add_done_callback(_stderr_tasks.discard)
    return proc


async def relay_stderr(stderr: asyncio.StreamReader, name: str) -> None:
    """Log each line a child writes to stderr, redacted and cut, until it closes."""
    child_log = logging.getLogger(f"{__name__}.{name}")
    pending = b""
    while chunk := await stderr.read(1 << 16):
        lines = (pending + chunk).split(b"\n")
        pending = lines.pop()[:MAX_STDERR_LINE]
        for line in lines:
            _log_line(child_log, line)
    if pending:
        _log_line(child_log, pending)


def _log_line(child_log: logging.Logger, line: bytes) -> None:
    text = redact(line[:MAX_STDERR_LINE].decode("utf-8", "replace").rstrip())
    if not text:
        return
    severity = _ABSL.match(text)
    level = _LEVELS[severity.group(1)] if severity else logging.WARNING
    child_log.log(level, "%s", text)


async def stop(proc: asyncio.subprocess.Process, grace_s: float = CLOSE_GRACE_S) -> None:
    """Hang up: close its stdin (the child winds down and exits), kill it if it lingers."""
    if proc.returncode is not None:
        return
    if proc.stdin is not None:
        proc.stdin.close()
    try:
        async with asyncio.timeout(grace_s):
            await proc.wait()
    except TimeoutError:
        pass
    finally:
        if proc.returncode is None:
            proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await proc.wait()
