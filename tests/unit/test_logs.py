"""Log redaction and the JSON line format."""

from __future__ import annotations

import io
import logging

import orjson

from bridge.logs import JsonFormatter, RedactSecrets

SENTINEL = "tok-SENTINEL-93b1"


def capture(fmt: logging.Formatter) -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(fmt)
    handler.addFilter(RedactSecrets([SENTINEL]))
    logger = logging.getLogger(f"test.redact.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, stream


def test_secret_in_message_args_and_exception_is_redacted() -> None:
    logger, stream = capture(logging.Formatter("%(message)s"))
    logger.debug("GET /ws/nav/x-r/?token=%s", SENTINEL)
    logger.info(f"inline {SENTINEL}")
    try:
        raise ValueError(f"bad uri wss://h/ws/?token={SENTINEL}")
    except ValueError:
        logger.exception("connect failed")
    text = stream.getvalue()
    assert SENTINEL not in text
    assert text.count("***") == 3
    assert "connect failed" in text


def test_json_lines_have_stable_keys() -> None:
    logger, stream = capture(JsonFormatter())
    logger.warning("reconnecting in %.1fs", 1.5, extra={"source": "vinter.nav:x-r"})
    doc = orjson.loads(stream.getvalue())
    assert doc["level"] == "WARNING"
    assert doc["msg"] == "reconnecting in 1.5s"
    assert doc["source"] == "vinter.nav:x-r"
    assert {"ts", "logger"} <= set(doc)
