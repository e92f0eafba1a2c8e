"""Log redaction and the JSON line format."""

from __future__ import annotations

import io
import logging

import orjson

from bridge.logs import DemoteRetried, JsonFormatter, RedactSecrets

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


def test_errors_aiokafka_retries_itself_are_not_logged_as_errors() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(DemoteRetried())
    fetcher = logging.getLogger("aiokafka.consumer.fetcher")
    shown = logging.getLogger("aiokafka.test.shown")
    previous = fetcher.level, shown.level
    fetcher.setLevel(logging.WARNING)
    shown.setLevel(logging.INFO)
    for logger in (fetcher, shown):
        logger.addHandler(handler)
    try:
        fetcher.error("Failed fetch offsets from 1: %s", "NotLeaderForPartitionError")
        fetcher.error("Failed fetch offsets from 1: %s", "TopicAuthorizationFailedError")
        shown.error("Got error produce response: LeaderNotAvailableError")
        fetcher.error('Unable connect to "%s:%s": %s', "127.0.0.1", 1, "Connection refused")
    finally:
        for logger in (fetcher, shown):
            logger.removeHandler(handler)
        fetcher.setLevel(previous[0])
        shown.setLevel(previous[1])
    assert stream.getvalue().splitlines() == [
        "ERROR Failed fetch offsets from 1: TopicAuthorizationFailedError",
        "INFO Got error produce response: LeaderNotAvailableError",
    ]
