"""Logging: JSON lines for machines, a short format for terminals, and secrets redacted.

Redaction is a last line of defence: every handler gets a filter that replaces the value of
each configured secret with `***`, so even a library that logs a URL with its token
(websockets does, at DEBUG) cannot leak it.
"""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

REDACTED = "***"
STANDARD_KEYS = frozenset(vars(logging.makeLogRecord({})))


class RedactSecrets(logging.Filter):
    """Replaces every known secret value in a record's message and arguments."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def _clean(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        message = record.getMessage()
        cleaned = self._clean(message)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = self._clean(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        if cleaned != message or record.args:
            record.msg, record.args = cleaned, None
        return True


def _retriable_errors() -> tuple[str, ...]:
    import aiokafka.errors

    return tuple(
        name
        for name, cls in vars(aiokafka.errors).items()
        if inspect.isclass(cls)
        and issubclass(cls, aiokafka.errors.KafkaError)
        and getattr(cls, "retriable", False)
    )


#: What aiokafka logs at ERROR before a bootstrap fails: the caller reports the failure.
_BOOTSTRAP_FAILED = 'Unable connect to "'


class DemoteRetried(logging.Filter):
    """aiokafka logs some errors it retries itself at ERROR (a partition of a topic just
    created has no leader yet: `NotLeaderForPartitionError`), and each failed bootstrap
    before raising it to the caller, who reports it; they are not the operator's to act on,
    so they are logged at INFO, and shown only when aiokafka's level allows."""

    def __init__(self) -> None:
        super().__init__()
        self._names = _retriable_errors()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith("aiokafka"):
            return True
        message = record.getMessage()
        bootstrap = message.startswith(_BOOTSTRAP_FAILED)
        if not bootstrap and not any(name in message for name in self._names):
            return True
        record.levelno, record.levelname = logging.INFO, "INFO"
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any `extra=` fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        for key, value in vars(record).items():
            if key not in STANDARD_KEYS and key not in doc:
                doc[key] = value
        return orjson.dumps(doc, default=str).decode()


def configure(level: str = "INFO", fmt: str = "json", secrets: Iterable[str] = ()) -> None:
    """Set up the root logger once for the process."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if fmt == "json"
        else logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    handler.addFilter(RedactSecrets(secrets))
    handler.addFilter(DemoteRetried())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiokafka logs every retried produce at WARNING; one line per failure is plenty.
    logging.getLogger("aiokafka").setLevel(max(logging.getLevelName(level), logging.WARNING))
