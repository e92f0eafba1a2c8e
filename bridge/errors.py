"""The bridge's one error tree; library errors are translated into it at the boundary.

    BridgeError
    ├── ConfigError          bad configuration: exit code 2, message names the key
    ├── BadRecord            upstream input that cannot become an event: dead-letter it
    ├── UpstreamError        a vendor API failed
    │   ├── AuthError        401/403, UNAUTHENTICATED, PERMISSION_DENIED: not retried hot
    │   └── (retriable)      disconnects, 5xx, 429, UNAVAILABLE: back off and retry
    ├── PublishError         Kafka refused or lost a send; the producer is unusable
    └── DependencyError      an installed library lacks a name the bridge relies on

`retriable` tells the supervisor whether a backoff-and-retry can help.
"""

from __future__ import annotations


class BridgeError(Exception):
    """Base of every error the bridge raises on purpose."""

    retriable: bool = False


class ConfigError(BridgeError):
    """The configuration is invalid; `key` is the dotted path of the (first) offending
    setting, `problems` every (key, message) found."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}" if key else message)
        self.key = key
        self.problems = [(key, message)]

    @classmethod
    def of(cls, problems: list[tuple[str, str]]) -> ConfigError:
        """One error for several problems: the first names the key, all are listed."""
        key, message = problems[0]
        error = cls(key, message)
        if len(problems) > 1:
            listed = "\n".join(f"  {k}: {m}" if k else f"  {m}" for k, m in problems)
            error.args = (f"{len(problems)} problems:\n{listed}",)
        error.problems = list(problems)
        return error


class BadRecord(BridgeError):  # noqa: N818 - the name reads as what it is, a bad record
    """An upstream record that cannot be turned into a valid event.

    `reason` is a short stable code (counted in metrics); `detail` explains it; `raw` is the
    offending input when the raiser has it (the caller dead-letters it).
    """

    def __init__(self, reason: str, detail: str = "", *, raw: bytes | str | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.raw = raw


class UpstreamError(BridgeError):
    """A vendor API failed; retriable unless stated otherwise."""

    retriable = True

    def __init__(self, source: str, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{source}: {message}")
        self.source = source
        self.message = message
        self.retry_after = retry_after


class AuthError(UpstreamError):
    """The vendor rejected our credentials; retrying soon cannot help.

    `setting` names the configuration key that holds the credential to fix.
    """

    retriable = False

    def __init__(self, source: str, message: str, *, setting: str) -> None:
        super().__init__(source, f"{message}; check the setting {setting}")
        self.setting = setting


class PublishError(BridgeError):
    """Kafka did not take an event, or the producer cannot send any more."""


class DependencyError(BridgeError):
    """An installed library lacks what the bridge relies on; the message says which."""
