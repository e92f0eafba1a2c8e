"""Typed settings: one frozen model per component, with its defaults and a description, so
a typo fails at start-up naming its dotted path (`bridge.configfile` loads them).

Secrets are `pydantic.SecretStr`: they print as `**********`. A secret may be written
inline, or as `{file: PATH}` (Kubernetes secrets mounted as files) or `{env: NAME}`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

HHMM = r"^([01]\d|2[0-3]):[0-5]\d$"
SYMBOL_RE = re.compile(r"^[a-z0-9][a-z0-9.\-]*-[dhr]$")


def _resolve_secret(value: Any, info: ValidationInfo) -> Any:
    """Read `{file: PATH}` or `{env: NAME}` secret references; pass other values through."""
    if isinstance(value, Mapping):
        if set(value) == {"file"}:
            if (info.context or {}).get("skip_files"):
                return "(not read)"
            path = Path(str(value["file"]))
            try:
                return path.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ValueError(f"cannot read secret file {path}: {exc.strerror}") from None
        if set(value) == {"env"}:
            name = str(value["env"])
            environ = (info.context or {}).get("environ", os.environ)
            if name not in environ:
                raise ValueError(f"environment variable {name} is not set")
            return environ[name]
        raise ValueError("a secret is a string, {file: PATH} or {env: NAME}")
    return value


Secret = Annotated[SecretStr, BeforeValidator(_resolve_secret)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Topics(_Model):
    nav_ticks: str = Field("vinter.nav.ticks", description="vinter.nav.tick events")
    vwap_ticks: str = Field("kaiko.vwap.ticks", description="kaiko.vwap.tick and bridge.gap")
    settlements: str = Field("vinter.nav.settlements", description="vinter.nav.settlement")
    dlq: str = Field("bridge.dlq", description="dead letters: bad input with its reason")
    state: str = Field("bridge.state", description="compacted checkpoints (internal)")
    control: str = Field(
        "bridge.control", description="one partition per shard; replicas share it as a group"
    )

    @classmethod
    def prefixed(cls, prefix: str) -> Topics:
        """A set of topics of its own (tests, benchmarks): `<prefix>.nav`, `<prefix>.dlq`, ..."""
        return cls(
            nav_ticks=f"{prefix}.nav",
            vwap_ticks=f"{prefix}.vwap",
            settlements=f"{prefix}.settle",
            dlq=f"{prefix}.dlq",
            state=f"{prefix}.state",
            control=f"{prefix}.control",
        )


class KafkaSettings(_Model):
    bootstrap_servers: str = Field("127.0.0.1:9092", description="comma-separated host:port")
    client_id: str = "kaiko-bridge"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: Path | None = Field(None, description="CA bundle for SSL/SASL_SSL")
    topics: Topics = Field(default_factory=Topics)
    partitions: int = Field(6, ge=1, description="partitions of topics the bridge creates")
    replication_factor: int = Field(1, ge=1, description="replication of created topics")
    min_insync_replicas: int | None = Field(None, ge=1, description="for created topics")
    create_topics: bool = Field(True, description="create missing topics at start")
    compression: Literal["lz4", "zstd", "gzip", "snappy", "none"] = "lz4"
    linger_ms: int = Field(5, ge=0, le=1000)
    max_batch_size: int = Field(256 * 1024, ge=1024)
    max_record_bytes: int = Field(
        1_000_000,
        ge=4096,
        description="largest event sent; larger ones become too_large dead letters "
        "(keep it under the topics' max.message.bytes)",
    )
    dlq_buffer: int = Field(
        10_000, ge=1, description="dead letters waiting for Kafka before their sources wait"
    )
    request_timeout_ms: int = Field(30_000, ge=1000)
    max_in_flight: int = Field(
        20_000, ge=1, description="unacknowledged events before sources are pushed back"
    )
    stall_timeout_s: float = Field(
        60.0, gt=0, description="no ack for this long while events are pending: rebuild producer"
    )
    transaction_timeout_ms: int = Field(
        300_000,
        ge=10_000,
        le=900_000,
        description="an open shard transaction the broker aborts after this long: longer "
        "than the Kafka outages to ride out (at most the brokers' transaction.max.timeout.ms)",
    )
    commit_interval_ms: int = Field(
        0,
        ge=0,
        le=60_000,
        description="least time between a shard's transaction commits (0: commit as soon as "
        "the last one ended)",
    )

    @model_validator(mode="after")
    def _sasl_complete(self) -> KafkaSettings:
        if self.security_protocol.startswith("SASL_"):
            if self.sasl_mechanism is None:
                raise ValueError("sasl_mechanism is required with a SASL security_protocol")
            if not self.sasl_username or self.sasl_password is None:
                raise ValueError("sasl_username and sasl_password are required with SASL")
        return self


def _check_symbol(symbol: str) -> str:
    if not SYMBOL_RE.match(symbol):
        raise ValueError(f"symbol {symbol!r} must be lower-case and end in -d, -h or -r")
    return symbol


NavSymbol = Annotated[str, BeforeValidator(lambda v: _check_symbol(str(v)))]


class VinterSettings(_Model):
    ws_url: str = Field("wss://www.vinterapi.com", description="scheme://host[:port] of the WS")
    rest_url: str = Field("https://www.vinterapi.com", description="base URL of the REST API")
    token: Secret | None = Field(None, description="WebSocket token (query parameter)")
    api_key: Secret | None = Field(None, description="REST API key (Authorization header)")
    allow_insecure: bool = Field(
        False, description="allow ws:// and http:// to hosts other than loopback (token in clear)"
    )
    symbols: list[NavSymbol] = Field(default_factory=list, description="one socket each")
    ping_interval_s: float = Field(20.0, gt=0)
    stale_after_s: float = Field(
        0.0, ge=0, description="reconnect a socket silent this long (0: per frequency default)"
    )
    backfill_max_age_s: float = Field(
        7 * 86400.0, gt=0, description="never back-fill further back than this"
    )
    revisions_kept: int = Field(
        16, ge=1, le=1000, description="newest timestamps per symbol whose versions are kept"
    )
    gap_floor_s: float = Field(
        1.0, ge=0, description="a real-time jump shorter than this is never a gap to fill"
    )
    gap_check_interval_s: float = Field(
        5.0, ge=0, description="at most one REST gap check per symbol this often"
    )
    max_message_bytes: int = Field(
        4 << 20, ge=1024, description="largest WebSocket message taken (larger: socket closed)"
    )
    max_queued_bytes: int = Field(
        8 << 20, ge=1024, description="messages queued per socket before its reading pauses"
    )
    max_body_bytes: int = Field(
        32 << 20, ge=1024, description="largest REST body read, after decompression"
    )

    @field_validator("ws_url", "rest_url")
    @classmethod
    def _no_query(cls, url: str, info: ValidationInfo) -> str:
        if "?" in url or "token=" in url:
            raise ValueError("give the base URL only; the token is a separate secret")
        return base_url(url, info.field_name or "")

    @model_validator(mode="after")
    def _secure(self) -> VinterSettings:
        if not self.allow_insecure:
            for key, url in (("ws_url", self.ws_url), ("rest_url", self.rest_url)):
                if insecure(url):
                    raise ValueError(
                        f"{key} {url} sends the credentials in clear to a host other than "
                        "loopback; use wss:// or https://, or set vinter.allow_insecure: true"
                    )
        return self


#: What a base URL may end in that the bridge adds itself, per setting.
_SUFFIXES = {"ws_url": "/ws/nav", "rest_url": "/api/v3"}
_SCHEMES = {"ws_url": ("ws", "wss"), "rest_url": ("http", "https")}
_LOOPBACK = ("localhost", "ip6-localhost")


def base_url(url: str, key: str) -> str:
    """`url` as a base the bridge appends its paths to: `scheme://host[:port][/prefix]`.

    A path the bridge adds itself (`/ws/nav` for the socket, `/api/v3` for REST) is taken
    off, so `wss://host/ws/nav` means what its writer meant; another path is kept as a
    prefix (a proxy's).
    """
    parts = urlsplit(url.strip())
    schemes = _SCHEMES.get(key, ())
    if schemes and parts.scheme not in schemes:
        raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
    if not parts.hostname:
        raise ValueError("has no host; the form is scheme://host[:port]")
    try:
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number
    except ValueError:
        raise ValueError("has a port that is not a number") from None
    path = parts.path.rstrip("/")
    suffix = _SUFFIXES.get(key, "")
    if suffix and path.endswith(suffix):
        path = path[: -len(suffix)]
    return f"{parts.scheme}://{parts.netloc}{path}"


def insecure(url: str) -> bool:
    """Whether `url` is plaintext (ws://, http://) to a host other than loopback."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "http"):
        return False
    host = (parts.hostname or "").lower()
    if host in _LOOPBACK:
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class VwapSubscription(_Model):
    exchange: str = Field(min_length=1)
    instrument_class: str = Field(min_length=1)
    code: str = Field(min_length=1)
    aggregate: str = Field("1s", pattern=r"^\d+[smhd]$")


class KaikoSettings(_Model):
    target: str = Field("gateway-v0-grpc.kaiko.ovh:443", description="gRPC host:port")
    api_key: Secret | None = Field(None, description="access token for call credentials")
    ca_file: Path | None = Field(None, description="root CA bundle; default: system roots")
    subscriptions: list[VwapSubscription] = Field(default_factory=list)
    stale_after_s: float = Field(30.0, gt=0, description="re-subscribe a silent stream")
    max_message_bytes: int = Field(
        4 << 20, ge=1024, description="largest gRPC message received (larger: stream ends)"
    )


class SettlementSettings(_Model):
    symbols: list[NavSymbol] = Field(default_factory=list, description="daily (-d) symbols")
    interval_s: float = Field(900.0, gt=0, description="poll period outside the window")
    window_start: str = Field("15:00", pattern=HHMM, description="UTC, HH:MM")
    window_end: str = Field("19:00", pattern=HHMM, description="UTC, HH:MM")
    window_interval_s: float = Field(60.0, gt=0, description="poll period inside the window")
    backfill_days: int = Field(30, ge=1, le=2000)
    lookback_days: int = Field(7, ge=1, le=365, description="re-check settled closes this far")
    transactional_id: str = Field(
        "kaiko-bridge-settlements",
        min_length=1,
        description="a poller run on its own (tools, tests); the service commits per shard",
    )

    @field_validator("symbols")
    @classmethod
    def _daily_only(cls, symbols: list[str]) -> list[str]:
        for symbol in symbols:
            if not symbol.endswith("-d"):
                raise ValueError(f"{symbol!r} is not a daily symbol (-d)")
        return symbols


class ShardSettings(_Model):
    count: int = Field(
        12, ge=1, le=1000, description="shards the subscriptions are hashed into (fixed once run)"
    )
    group_id: str = Field("kaiko-bridge", min_length=1, description="consumer group of replicas")
    instance_id: str | None = Field(
        None, min_length=1, description="static member name (the pod name); None: dynamic"
    )
    transactional_id_prefix: str = Field(
        "kaiko-bridge", min_length=1, description="shard n publishes as <prefix>-shard-<n>"
    )
    session_timeout_ms: int = Field(
        10_000, ge=1000, le=300_000, description="a replica silent this long loses its shards"
    )
    heartbeat_interval_ms: int = Field(1_000, ge=100, description="under a third of the above")

    @model_validator(mode="after")
    def _heartbeat_fits(self) -> ShardSettings:
        if self.heartbeat_interval_ms * 3 > self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be at most a third of session_timeout_ms")
        return self

    def transactional_id(self, shard: int) -> str:
        return f"{self.transactional_id_prefix}-shard-{shard}"


class OpsSettings(_Model):
    host: str = "0.0.0.0"  # noqa: S104 - probes and scrapes come from outside the pod
    port: int = Field(8080, ge=0, le=65535)


class Settings(_Model):
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    vinter: VinterSettings = Field(default_factory=VinterSettings)
    kaiko: KaikoSettings = Field(default_factory=KaikoSettings)
    settlement: SettlementSettings = Field(default_factory=SettlementSettings)
    shards: ShardSettings = Field(default_factory=ShardSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    shutdown_grace_s: float = Field(25.0, gt=0)
