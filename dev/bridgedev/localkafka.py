"""A real Apache Kafka broker (KRaft mode) on loopback, for tests and the demo.

The broker is the official Kafka server from Maven Central, run as a plain JVM
process; no Docker engine is needed. Jars are resolved once with Maven into a
cache directory (``$BRIDGE_KAFKA_HOME``, default ``<repo>/.cache/kafka``)::

    python -m bridgedev.localkafka fetch           # resolve the jars (once)
    python -m bridgedev.localkafka start           # background broker, prints bootstrap
    python -m bridgedev.localkafka status
    python -m bridgedev.localkafka stop

From Python::

    with LocalKafka() as kafka:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap)

``LocalKafka`` is one combined broker+controller node. ``LocalKafkaCluster``
runs several of them (static controller quorum, replication factor 3,
``min.insync.replicas=2``). Both offer ``stop``/``kill``/``pause``/``resume``
and can be started again on the same data directory, which is what
fault-injection tests need.

``scram_users={"name": "password"}`` adds a ``SASL_SSL`` listener (SCRAM-SHA-512,
a certificate from a private CA) beside the PLAINTEXT one; clients connect to
``sasl_bootstrap`` and trust ``ca_file``.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

KAFKA_VERSION = "4.2.0"
"""The broker version; must match ``tools/kafka/pom.xml``."""

HOST = "127.0.0.1"
READY_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
FETCH_TIMEOUT_S = 900.0
JVM_HEAP_OPTS: tuple[str, ...] = ("-Xmx1g", "-Xms1g")
"""What Kafka's own start script (``kafka-server-start.sh``) gives a broker. A broker holds
about 160 MB from start-up (its log cleaner's 128 MB dedupe buffer among it); in a 512 MB
heap that sits at G1's marking threshold, and a concurrent cycle, with its remark pause
(up to 225 ms seen), started every few young collections. In 1 GB: once, after start-up."""
JVM_GC_OPTS: tuple[str, ...] = (
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
)
"""What Kafka's own start script (``kafka-run-class.sh``) runs a broker with. G1's default
pause goal is 200 ms: young collections of 40-60 ms then stall every produce request, and
show up whole in the bridge's receive -> ack p99."""

_MARKER = ".fetched"
_STATE_FILE = "broker.json"


class LocalKafkaError(RuntimeError):
    """The local broker could not be fetched, started or stopped."""


# --------------------------------------------------------------------------- paths


def repo_root() -> Path:
    """The checkout this module lives in (``<repo>/dev/bridgedev/localkafka.py``)."""
    return Path(__file__).resolve().parents[2]


def pom_path() -> Path:
    return repo_root() / "tools" / "kafka" / "pom.xml"


def cache_dir() -> Path:
    """Where jars and CLI state live: ``$BRIDGE_KAFKA_HOME`` or ``<repo>/.cache/kafka``."""
    env = os.environ.get("BRIDGE_KAFKA_HOME")
    return Path(env).expanduser().resolve() if env else repo_root() / ".cache" / "kafka"


def libs_dir() -> Path:
    return cache_dir() / KAFKA_VERSION / "libs"


def run_dir() -> Path:
    return cache_dir() / "run"


# --------------------------------------------------------------------------- fetch


def _pom_digest(pom: Path) -> str:
    return hashlib.sha256(pom.read_bytes()).hexdigest()


def is_fetched() -> bool:
    """True when the jars for :data:`KAFKA_VERSION` and the current pom are cached."""
    marker = libs_dir() / _MARKER
    pom = pom_path()
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (
        isinstance(recorded, dict)
        and recorded.get("version") == KAFKA_VERSION
        and pom.is_file()
        and recorded.get("pom_sha256") == _pom_digest(pom)
    )


def fetch(*, force: bool = False, quiet: bool = False) -> Path:
    """Resolve the broker jars with Maven (once) and return the directory holding them.

    Concurrent callers (parallel test workers) serialise on a lock file, so the
    jars are downloaded once. Raises :class:`LocalKafkaError` with a readable
    message when Maven is missing or resolution fails.
    """
    libs = libs_dir()
    if not force and is_fetched():
        return libs
    pom = pom_path()
    if not pom.is_file():
        raise LocalKafkaError(f"Kafka pom not found at {pom}")
    mvn = shutil.which("mvn")
    if mvn is None:
        raise LocalKafkaError(
            "Maven ('mvn') is not on PATH; it is needed once to download the Kafka "
            f"{KAFKA_VERSION} broker jars into {libs}. Install Maven (e.g. 'apt-get install "
            "maven'), or point BRIDGE_TEST_KAFKA at an existing broker, or run "
            f"'docker run -p 9092:9092 apache/kafka:{KAFKA_VERSION}'."
        )
    libs.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(cache_dir() / ".fetch.lock"):
        if not force and is_fetched():
            return libs
        if libs.exists():
            shutil.rmtree(libs)
        if not quiet:
            print(f"Fetching Kafka {KAFKA_VERSION} jars into {libs} ...", file=sys.stderr)
        cmd = [
            mvn,
            "-q",
            "-B",
            "-f",
            str(pom),
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
            f"-DoutputDirectory={libs}",
        ]
        try:
            done = subprocess.run(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=FETCH_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalKafkaError(f"mvn did not finish within {FETCH_TIMEOUT_S:.0f}s") from exc
        jars = sorted(libs.glob("*.jar")) if libs.is_dir() else []
        if done.returncode != 0 or not any(j.name.startswith("kafka_2.13-") for j in jars):
            tail = "\n".join(done.stdout.splitlines()[-40:])
            raise LocalKafkaError(
                f"mvn failed (exit {done.returncode}) resolving Kafka {KAFKA_VERSION}:\n"
                f"  {' '.join(cmd)}\n{tail}"
            )
        marker = {"version": KAFKA_VERSION, "pom_sha256": _pom_digest(pom), "jars": len(jars)}
        (libs / _MARKER).write_text(json.dumps(marker) + "\n")
        if not quiet:
            print(f"Fetched {len(jars)} jars.", file=sys.stderr)
    return libs


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _java() -> str:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise LocalKafkaError(f"'java' (17 or newer) is needed to run Kafka {KAFKA_VERSION}")
    return found


# --------------------------------------------------------------------------- helpers


def random_cluster_id() -> str:
    """A cluster id as ``kafka-storage random-uuid`` makes it: 16 random bytes, base64url."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        if not cid.startswith("-"):  # Kafka avoids ids that look like command-line flags
            return cid


def free_ports(count: int) -> list[int]:
    """``count`` distinct ports on the loopback interface that are free right now."""
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.bind((HOST, 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 256 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass(frozen=True, slots=True)
class ClusterMetadata:
    """What a broker reported in its answer to a Metadata request."""

    cluster_id: str | None
    controller_id: int
    brokers: tuple[tuple[int, str, int], ...]  # (node id, host, port)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def take(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self._data, self._pos)
        self._pos += struct.calcsize(fmt)
        return value

    def string(self) -> str | None:
        length = int(self.take(">h"))
        if length < 0:
            return None
        raw = self._data[self._pos : self._pos + length]
        self._pos += length
        return raw.decode("utf-8")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks: list[bytes] = []
    while size:
        chunk = sock.recv(min(size, 65536))
        if not chunk:
            raise ConnectionError("connection closed by broker")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def probe_metadata(bootstrap: str, timeout: float = 2.0) -> ClusterMetadata:
    """Send one Kafka Metadata (v4, no topics) request and parse the broker list.

    Speaks the wire protocol directly so that it works with no event loop and
    no client library; raises ``OSError``/``ValueError`` when the broker does not
    answer properly within ``timeout``.
    """
    host, _, port = bootstrap.split(",", maxsplit=1)[0].strip().rpartition(":")
    client_id = b"bridge-localkafka"
    correlation_id = 0x4B50
    # Request header v1: api_key=3 (Metadata), api_version=4, correlation id, client id.
    header = struct.pack(">hhih", 3, 4, correlation_id, len(client_id)) + client_id
    body = struct.pack(">i?", 0, False)  # topics: empty array; allow_auto_topic_creation
    payload = header + body
    with socket.create_connection((host or HOST, int(port)), timeout=timeout) as sock:
        sock.settimeout(timeout)
        sock.sendall(struct.pack(">i", len(payload)) + payload)
        (size,) = struct.unpack(">i", _recv_exact(sock, 4))
        if not 8 <= size <= 1 << 20:
            raise ValueError(f"implausible Metadata response size {size}")
        reader = _Reader(_recv_exact(sock, size))
    if reader.take(">i") != correlation_id:
        raise ValueError("Metadata response with a foreign correlation id")
    reader.take(">i")  # throttle_time_ms
    brokers: list[tuple[int, str, int]] = []
    for _ in range(int(reader.take(">i"))):
        node_id = int(reader.take(">i"))
        broker_host = reader.string() or ""
        broker_port = int(reader.take(">i"))
        reader.string()  # rack
        brokers.append((node_id, broker_host, broker_port))
    cluster_id = reader.string()
    controller_id = int(reader.take(">i"))
    return ClusterMetadata(cluster_id, controller_id, tuple(brokers))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_kafka_process(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            return b"kafka.Kafka" in handle.read()
    except OSError:
        return _pid_alive(pid)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)  # the broker leads its own process group (start_new_session)


def _wait_all_stopped(pid: int, timeout: float) -> None:
    """Wait until every thread of `pid` is in the stopped state (`T`), or `timeout` passes."""
    deadline = time.monotonic() + timeout
    tasks = Path(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        if not tasks.exists():
            return  # the process is gone
        try:
            states = [
                (task / "stat").read_text().rpartition(")")[2].split()[0]
                for task in tasks.iterdir()
            ]
        except (FileNotFoundError, ProcessLookupError):
            states = []  # a thread ended while we looked: look again
        if states and all(state in "Tt" for state in states):
            return
        time.sleep(0.01)


def _wait_pid_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


_LOG4J2 = """\
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = {log}
appender.file.filePattern = {log}.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 20MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = 2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = WARN
logger.state.name = state.change.logger
logger.state.level = WARN
logger.cleaner.name = kafka.log.LogCleaner
logger.cleaner.level = WARN
logger.network.name = org.apache.kafka.clients.NetworkClient
logger.network.level = WARN
"""


# --------------------------------------------------------------------------- SASL_SSL

SASL_LISTENER = "SASL_SSL"
SCRAM_MECHANISM = "SCRAM-SHA-512"
_JAAS_SCRAM = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
_SCRAM_UNSAFE = ',[]="\\'


@dataclass(frozen=True, slots=True)
class BrokerTls:
    """PEM files for a SASL_SSL listener: what clients trust, and what the broker presents."""

    ca_file: Path  # the private CA's certificate
    keystore: Path  # the broker's PKCS#8 private key followed by its certificate


def _check_scram_users(users: Mapping[str, str] | None) -> dict[str, str] | None:
    """Names and passwords as ``kafka-storage format --add-scram`` can carry them."""
    if users is None:
        return None
    if not users:
        raise ValueError("scram_users: give at least one user (or None for no SASL_SSL)")
    for name, password in users.items():
        for what, value in (("name", name), ("password", password)):
            if not value or any(c in _SCRAM_UNSAFE or c.isspace() for c in value):
                raise ValueError(
                    f"scram_users: a {what} must be non-empty, without spaces or any of "
                    f"{_SCRAM_UNSAFE!r} (user {name!r})"
                )
    return dict(users)


def broker_tls(directory: str | os.PathLike[str]) -> BrokerTls:
    """A private CA and a broker certificate for 127.0.0.1 and localhost in ``directory``.

    Made on first use and reused afterwards (a restarted broker keeps its certificate, so
    clients keep trusting the same ``ca.pem``); nodes of a cluster share one directory.
    Needs the ``sim`` extra (``trustme``).
    """
    folder = Path(directory)
    tls = BrokerTls(ca_file=folder / "ca.pem", keystore=folder / "broker.pem")
    with _file_lock(folder / ".tls.lock"):
        if tls.ca_file.is_file() and tls.keystore.is_file():
            return tls
        try:
            from cryptography.hazmat.primitives import serialization

            from bridgedev.sim.tls import TestCA
        except ImportError as exc:
            raise LocalKafkaError(
                "a SASL_SSL listener needs the 'sim' extra (trustme) for its certificate"
            ) from exc
        ca = TestCA()
        # Kafka's PEM key stores read PKCS#8 keys only; trustme writes EC keys as SEC1.
        key = serialization.load_pem_private_key(ca.server_key_pem, password=None)
        pkcs8 = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        tls.keystore.write_bytes(pkcs8 + ca.server_cert_chain_pem)
        tls.keystore.chmod(0o600)
        ca.write_ca(tls.ca_file)
    return tls


# --------------------------------------------------------------------------- one node


# Started brokers, so that they are stopped when Python exits (even if the
# object was dropped): a forgotten JVM would otherwise outlive the test run.
_RUNNING: set[LocalKafka] = set()
_RUNNING_LOCK = threading.Lock()


@atexit.register
def _stop_leftovers() -> None:
    with _RUNNING_LOCK:
        leftovers = list(_RUNNING)
    for broker in leftovers:
        with contextlib.suppress(Exception):
            broker.stop()


class _ContextManaged:
    """`with` and `async with` for anything with start/stop and astart/astop."""

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    async def astart(self) -> Self:
        raise NotImplementedError

    async def astop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()


class LocalKafka(_ContextManaged):
    """One Kafka node (combined broker and controller) listening on 127.0.0.1.

    ``port``/``controller_port`` default to free ports (kept across restarts).
    ``data_dir`` defaults to a fresh temporary directory that :meth:`stop`
    deletes (unless ``keep_dir``); a caller-supplied ``data_dir`` is never
    deleted, and a directory that was formatted before is reused as it is.
    ``properties`` override or extend the generated ``server.properties``.

    The cluster-wiring arguments (``node_id``, ``quorum_voters``, ``cluster_id``,
    ``expected_brokers``) are what :class:`LocalKafkaCluster` uses; a single
    node leaves them alone and gets a standalone dynamic quorum.

    ``scram_users`` (name -> password) adds a ``SASL_SSL`` listener on ``sasl_port``
    (default: free) that takes SCRAM-SHA-512 only; the users are created when the data
    directory is formatted. Its certificate, for 127.0.0.1 and localhost, comes from a
    private CA kept in ``tls_dir`` (default ``<data_dir>/tls``); clients trust
    :attr:`ca_file`. The PLAINTEXT and controller listeners stay as they are.
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        controller_port: int | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        keep_dir: bool = False,
        properties: Mapping[str, str | int] | None = None,
        node_id: int = 1,
        quorum_voters: str | None = None,
        cluster_id: str | None = None,
        expected_brokers: int = 1,
        ready_timeout: float = READY_TIMEOUT_S,
        heap_opts: Sequence[str] = JVM_HEAP_OPTS,
        scram_users: Mapping[str, str] | None = None,
        sasl_port: int | None = None,
        tls_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.node_id = node_id
        self._quorum_voters = quorum_voters
        self._cluster_id = cluster_id
        self._expected_brokers = expected_brokers
        self._properties = {k: str(v) for k, v in (properties or {}).items()}
        self.ready_timeout = ready_timeout
        self._heap_opts = tuple(heap_opts)
        self._owns_dir = data_dir is None
        self._keep_dir = keep_dir
        self._dir: Path | None = Path(data_dir).resolve() if data_dir is not None else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._detached_pid: int | None = None
        self._paused = False
        self.port, self.controller_port = self._choose_ports(port, controller_port)
        self.startup_seconds: float | None = None
        self._launched_at: float | None = None
        self._scram_users = _check_scram_users(scram_users)
        self._tls_dir = Path(tls_dir).resolve() if tls_dir is not None else None
        self.sasl_port: int | None = None
        if self._scram_users is not None:
            self.sasl_port = (
                sasl_port
                or self._previous_sasl_port()
                or next(p for p in free_ports(3) if p not in (self.port, self.controller_port))
            )

    # ------------------------------------------------------------------ properties

    @property
    def sasl_bootstrap(self) -> str:
        """``host:port`` of the SASL_SSL listener (SCRAM-SHA-512)."""
        if self.sasl_port is None:
            raise LocalKafkaError("this broker has no SASL_SSL listener (give scram_users)")
        return f"{HOST}:{self.sasl_port}"

    @property
    def tls(self) -> BrokerTls:
        """Where the SASL_SSL listener's CA and key store are (made at :meth:`launch`)."""
        folder = self._tls_dir or self.data_dir / "tls"
        return BrokerTls(ca_file=folder / "ca.pem", keystore=folder / "broker.pem")

    @property
    def ca_file(self) -> Path:
        """The PEM file clients of :attr:`sasl_bootstrap` trust (``ssl_cafile``)."""
        return self.tls.ca_file

    def _previous_sasl_port(self) -> int | None:
        if self._dir is None:
            return None
        try:
            text = (self._dir / "server.properties").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "listeners":
                for listener in value.split(","):
                    name, _, address = listener.strip().partition("://")
                    if name == SASL_LISTENER:
                        with contextlib.suppress(ValueError):
                            return int(address.rpartition(":")[2])
        return None

    def _sasl_ssl_properties(self, props: Mapping[str, str]) -> dict[str, str]:
        """The SASL_SSL listener added to the generated ``props``."""
        listener = f"{SASL_LISTENER}://{self.sasl_bootstrap}"
        prefix = f"listener.name.{SASL_LISTENER.lower()}"
        return {
            "listeners": f"{props['listeners']},{listener}",
            "advertised.listeners": f"{props['advertised.listeners']},{listener}",
            "listener.security.protocol.map": (
                f"{props['listener.security.protocol.map']},{SASL_LISTENER}:{SASL_LISTENER}"
            ),
            f"{prefix}.sasl.enabled.mechanisms": SCRAM_MECHANISM,
            f"{prefix}.{SCRAM_MECHANISM.lower()}.sasl.jaas.config": _JAAS_SCRAM,
            f"{prefix}.ssl.keystore.type": "PEM",
            f"{prefix}.ssl.keystore.location": str(self.tls.keystore),
            f"{prefix}.ssl.client.auth": "none",
        }

    @property
    def bootstrap(self) -> str:
        """``host:port`` for ``bootstrap_servers``."""
        return f"{HOST}:{self.port}"

    @property
    def controller_endpoint(self) -> str:
        return f"{HOST}:{self.controller_port}"

    @property
    def data_dir(self) -> Path:
        """The node's directory: ``server.properties``, ``kraft/`` (log.dirs), ``logs/``."""
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix=f"bridge-kafka-{self.node_id}-"))
        return self._dir

    @property
    def log_dir(self) -> Path:
        """Kafka's ``log.dirs`` (topic partitions and the metadata log)."""
        return self.data_dir / "kraft"

    @property
    def server_log(self) -> Path:
        return self.data_dir / "logs" / "server.log"

    @property
    def console_log(self) -> Path:
        return self.data_dir / "logs" / "console.log"

    @property
    def gc_log(self) -> Path:
        """The JVM's garbage-collection pauses, as Kafka's start script logs them: where a
        latency tail on this broker comes from, when it comes from the broker."""
        return self.data_dir / "logs" / "gc.log"

    @property
    def pid(self) -> int | None:
        if self._proc is not None:
            return self._proc.pid
        return self._detached_pid

    @property
    def running(self) -> bool:
        """The broker process exists (it may be paused)."""
        if self._proc is not None:
            return self._proc.poll() is None
        return self._detached_pid is not None and _pid_alive(self._detached_pid)

    @property
    def paused(self) -> bool:
        return self._paused

    def _choose_ports(self, port: int | None, controller_port: int | None) -> tuple[int, int]:
        previous = self._read_previous_ports()
        port = port or previous[0]
        controller_port = controller_port or previous[1]
        if port and controller_port:
            return port, controller_port
        fresh = iter(p for p in free_ports(3) if p not in (port, controller_port))
        return port or next(fresh), controller_port or next(fresh)

    def _read_previous_ports(self) -> tuple[int | None, int | None]:
        if self._dir is None:
            return None, None
        try:
            text = (self._dir / "server.properties").read_text()
        except OSError:
            return None, None
        found: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "listeners":
                for listener in value.split(","):
                    name, _, address = listener.strip().partition("://")
                    with contextlib.suppress(ValueError):
                        found[name] = int(address.rpartition(":")[2])
        return found.get("PLAINTEXT"), found.get("CONTROLLER")

    # ------------------------------------------------------------------ config

    def server_properties(self) -> dict[str, str]:
        """The ``server.properties`` this node runs with."""
        props: dict[str, str] = {
            "process.roles": "broker,controller",
            "node.id": str(self.node_id),
            "listeners": f"PLAINTEXT://{self.bootstrap},CONTROLLER://{self.controller_endpoint}",
            "advertised.listeners": (
                f"PLAINTEXT://{self.bootstrap},CONTROLLER://{self.controller_endpoint}"
            ),
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": str(self.log_dir),
            "num.partitions": "3",
            "default.replication.factor": "1",
            "min.insync.replicas": "1",
            "offsets.topic.replication.factor": "1",
            "offsets.topic.num.partitions": "10",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "transaction.state.log.num.partitions": "10",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            # A restarted node may only re-register once its previous session has
            # expired (DUPLICATE_BROKER_REGISTRATION until then); the defaults (9 s
            # session, 2 s heartbeat) make every crash-restart take ~15 s.
            "broker.heartbeat.interval.ms": "500",
            "broker.session.timeout.ms": "4000",
            "auto.create.topics.enable": "false",
            "delete.topic.enable": "true",
            "num.network.threads": "3",
            "num.io.threads": "4",
            "num.recovery.threads.per.data.dir": "1",
            "log.segment.bytes": str(16 * 1024 * 1024),
            "log.retention.hours": "168",
            "log.retention.check.interval.ms": "60000",
        }
        if self._quorum_voters:
            props["controller.quorum.voters"] = self._quorum_voters
        else:
            props["controller.quorum.bootstrap.servers"] = self.controller_endpoint
        if self._scram_users is not None:
            props.update(self._sasl_ssl_properties(props))
        props.update(self._properties)
        return props

    def _write_config(self) -> Path:
        directory = self.data_dir
        (directory / "logs").mkdir(parents=True, exist_ok=True)
        config = directory / "server.properties"
        lines = [f"# Generated by bridgedev.localkafka for Kafka {KAFKA_VERSION}"]
        lines += [f"{key}={value}" for key, value in self.server_properties().items()]
        config.write_text("\n".join(lines) + "\n")
        (directory / "log4j2.properties").write_text(_LOG4J2.format(log=self.server_log))
        return config

    def _java_cmd(
        self, main: str, *args: str, heap: Sequence[str] | None = None, jvm: Sequence[str] = ()
    ) -> list[str]:
        libs = libs_dir()
        if not is_fetched():
            raise LocalKafkaError(
                f"Kafka jars are not in {libs}; run 'python -m bridgedev.localkafka fetch' "
                "(or bridgedev.localkafka.fetch()) first"
            )
        return [
            _java(),
            *(self._heap_opts if heap is None else heap),
            *JVM_GC_OPTS,
            *jvm,
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            "-Dlog4j2.shutdownHookEnabled=false",
            f"-Dlog4j2.configurationFile={self.data_dir / 'log4j2.properties'}",
            f"-Dkafka.logs.dir={self.data_dir / 'logs'}",
            "-cp",
            str(libs / "*"),
            main,
            *args,
        ]

    def _format(self, config: Path) -> None:
        if (self.log_dir / "meta.properties").is_file():
            return  # formatted before: restart on the existing data
        if self._cluster_id is None:
            self._cluster_id = random_cluster_id()
        args = ["format", "-t", self._cluster_id, "-c", str(config)]
        if not self._quorum_voters:
            args.append("--standalone")
        for name, password in (self._scram_users or {}).items():
            args += ["--add-scram", f"{SCRAM_MECHANISM}=[name={name},password={password}]"]
        cmd = self._java_cmd("kafka.tools.StorageTool", *args, heap=("-Xmx256m",))
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise LocalKafkaError(
                f"formatting {self.log_dir} failed (exit {done.returncode}):\n{done.stdout}"
            )

    @property
    def cluster_id(self) -> str | None:
        """The cluster id recorded in the formatted data directory (``None`` before)."""
        try:
            text = (self.log_dir / "meta.properties").read_text()
        except OSError:
            return self._cluster_id
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip() == "cluster.id":
                return value.strip()
        return self._cluster_id

    # ------------------------------------------------------------------ lifecycle

    def launch(self) -> None:
        """Format (first time only) and spawn the broker without waiting for it."""
        if self.running:
            raise LocalKafkaError(f"broker {self.node_id} is already running (pid {self.pid})")
        self._reap()
        if self._scram_users is not None:
            broker_tls(self.tls.keystore.parent)
        config = self._write_config()
        self._format(config)
        gc_log = f"-Xlog:gc:file={self.gc_log}:time,uptime:filecount=2,filesize=10M"
        cmd = self._java_cmd("kafka.Kafka", str(config), jvm=(gc_log,))
        with self.console_log.open("ab") as console:
            console.write(f"--- start {time.strftime('%Y-%m-%dT%H:%M:%S')}\n".encode())
            console.flush()
            self._proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                start_new_session=True,  # own process group: signals reach the whole JVM
            )
        self._paused = False
        self._launched_at = time.monotonic()
        with _RUNNING_LOCK:
            _RUNNING.add(self)

    def wait_ready(self, timeout: float | None = None) -> ClusterMetadata:
        """Poll with Metadata requests until the broker lists itself (and its peers).

        Fails fast, with the tail of the broker log, if the process exits.
        """
        limit = self.ready_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        last_error: Exception | None = None
        while True:
            if not self.running:
                code = self._proc.returncode if self._proc is not None else None
                raise LocalKafkaError(
                    f"Kafka broker {self.node_id} exited (code {code}) before it was ready.\n"
                    f"{self._log_tails()}"
                )
            try:
                meta = probe_metadata(self.bootstrap, timeout=2.0)
            except (OSError, ValueError, struct.error) as exc:
                last_error = exc
            else:
                ids = {broker[0] for broker in meta.brokers}
                if self.node_id in ids and len(ids) >= self._expected_brokers:
                    if self._launched_at is not None:
                        self.startup_seconds = time.monotonic() - self._launched_at
                    return meta
                last_error = LocalKafkaError(f"brokers so far: {sorted(ids)}")
            if time.monotonic() >= deadline:
                raise LocalKafkaError(
                    f"Kafka broker {self.node_id} at {self.bootstrap} not ready after "
                    f"{limit:.0f}s (last: {last_error!r}).\n{self._log_tails()}"
                )
            time.sleep(0.25)

    def start(self) -> Self:
        """Start (or restart on the same data dir) and block until the broker answers."""
        self.launch()
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def _log_tails(self) -> str:
        errors = [
            line
            for line in _tail(self.server_log, 2000).splitlines()
            if " ERROR " in line or " FATAL " in line
        ]
        text = f"--- {self.console_log} (tail):\n{_tail(self.console_log, 15)}\n"
        if errors:
            text += f"--- {self.server_log} (errors):\n" + "\n".join(errors[-8:]) + "\n"
        return text + f"--- {self.server_log} (tail):\n{_tail(self.server_log, 20)}"

    def _reap(self) -> None:
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._detached_pid is not None and not _pid_alive(self._detached_pid):
            self._detached_pid = None

    def _signal(self, sig: signal.Signals) -> None:
        pid = self.pid
        if pid is not None and self.running:
            _signal_group(pid, sig)

    def terminate(self) -> None:
        """Send SIGTERM (a controlled shutdown) without waiting."""
        self._signal(signal.SIGTERM)
        if self._paused:
            self._signal(signal.SIGCONT)
            self._paused = False

    def wait_stopped(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Wait for the process to exit, SIGKILL-ing it after ``timeout`` seconds."""
        if self._proc is not None:
            try:
                self._proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _signal_group(self._proc.pid, signal.SIGKILL)
                self._proc.wait(timeout=30)
        elif self._detached_pid is not None and not _wait_pid_gone(self._detached_pid, timeout):
            _signal_group(self._detached_pid, signal.SIGKILL)
            _wait_pid_gone(self._detached_pid, 30)
        self._reap()
        self._paused = False
        with _RUNNING_LOCK:
            _RUNNING.discard(self)

    def stop(self, *, keep_dir: bool | None = None, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM, wait up to ``timeout`` s, then SIGKILL. Idempotent.

        Deletes the data directory if this object created it, unless ``keep_dir``
        (here or in the constructor) asks to keep it, e.g. to :meth:`start` again.
        """
        self.terminate()
        self.wait_stopped(timeout)
        keep = self._keep_dir if keep_dir is None else keep_dir
        if self._owns_dir and not keep and self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def kill(self) -> None:
        """SIGKILL (a crash); the data directory stays so :meth:`start` can recover it."""
        self._signal(signal.SIGKILL)
        self.wait_stopped(timeout=30)

    def pause(self) -> None:
        """SIGSTOP: the process hangs with its sockets open (a stalled broker). Returns once
        every thread has stopped: the signal is taken asynchronously, and a busy machine
        can let a thread answer one more request first."""
        self._signal(signal.SIGSTOP)
        self._paused = self.running
        if self._paused and self.pid is not None:
            _wait_all_stopped(self.pid, timeout=10)

    def resume(self) -> None:
        """SIGCONT after :meth:`pause`."""
        self._signal(signal.SIGCONT)
        self._paused = False

    def detach(self) -> int:
        """Leave the broker running after this Python process exits; returns its pid."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise LocalKafkaError("no running broker to detach")
        self._detached_pid = proc.pid
        self._proc = None
        with _RUNNING_LOCK:
            _RUNNING.discard(self)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            del proc  # Popen warns about a live child when collected; here that is intended
        return self._detached_pid

    # ------------------------------------------------------------------ async + context

    async def astart(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def astop(self, *, keep_dir: bool | None = None) -> None:
        await asyncio.to_thread(lambda: self.stop(keep_dir=keep_dir))

    async def akill(self) -> None:
        await asyncio.to_thread(self.kill)

    def __repr__(self) -> str:
        state = "paused" if self._paused else "running" if self.running else "stopped"
        return f"<LocalKafka node={self.node_id} {self.bootstrap} {state} dir={self._dir}>"


# --------------------------------------------------------------------------- cluster


class LocalKafkaCluster(_ContextManaged):
    """``nodes`` combined broker+controller processes on loopback, one cluster id.

    The controller quorum is static (``controller.quorum.voters`` lists every
    node); topics default to replication factor ``min(3, nodes)`` with
    ``min.insync.replicas`` one less. Individual nodes are in :attr:`nodes` for
    kill/pause/restart.

    ``scram_users`` gives every node a SASL_SSL listener as in :class:`LocalKafka`, with
    certificates from one CA (``<root>/tls``): :attr:`sasl_bootstrap`, :attr:`ca_file`.
    """

    def __init__(
        self,
        nodes: int = 3,
        *,
        data_dir: str | os.PathLike[str] | None = None,
        keep_dir: bool = False,
        properties: Mapping[str, str | int] | None = None,
        ready_timeout: float = READY_TIMEOUT_S,
        heap_opts: Sequence[str] = JVM_HEAP_OPTS,
        scram_users: Mapping[str, str] | None = None,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self._owns_dir = data_dir is None
        self._keep_dir = keep_dir
        self.root = (
            Path(data_dir).resolve()
            if data_dir is not None
            else Path(tempfile.mkdtemp(prefix="bridge-kafka-cluster-"))
        )
        replication = min(3, nodes)
        min_isr = max(1, replication - 1)
        defaults: dict[str, str | int] = {
            "default.replication.factor": replication,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replication,
            "transaction.state.log.replication.factor": replication,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replication,
            "share.coordinator.state.topic.min.isr": min_isr,
        }
        defaults.update(properties or {})
        ports = free_ports(2 * nodes)
        voters = ",".join(f"{i + 1}@{HOST}:{ports[2 * i + 1]}" for i in range(nodes))
        cluster_id = random_cluster_id()
        sasl_ports: Sequence[int | None] = [None] * nodes
        if scram_users is not None:
            sasl_ports = [p for p in free_ports(3 * nodes) if p not in ports][:nodes]
        self.nodes: list[LocalKafka] = [
            LocalKafka(
                port=ports[2 * i],
                controller_port=ports[2 * i + 1],
                data_dir=self.root / f"node-{i + 1}",
                properties=defaults,
                node_id=i + 1,
                quorum_voters=voters,
                cluster_id=cluster_id,
                expected_brokers=nodes,
                ready_timeout=ready_timeout,
                heap_opts=heap_opts,
                scram_users=scram_users,
                sasl_port=sasl_ports[i],
                tls_dir=self.root / "tls",
            )
            for i in range(nodes)
        ]
        self.ready_timeout = ready_timeout
        self.startup_seconds: float | None = None

    @property
    def bootstrap(self) -> str:
        return ",".join(node.bootstrap for node in self.nodes)

    @property
    def sasl_bootstrap(self) -> str:
        """Every node's SASL_SSL listener (SCRAM-SHA-512)."""
        return ",".join(node.sasl_bootstrap for node in self.nodes)

    @property
    def ca_file(self) -> Path:
        """The CA that signed every node's certificate."""
        return self.nodes[0].ca_file

    def start(self) -> Self:
        """Launch every stopped node, then wait until each lists all brokers."""
        began = time.monotonic()
        try:
            stopped = [node for node in self.nodes if not node.running]
            if stopped:  # formatting and JVM start-up are slow; do the nodes side by side
                with ThreadPoolExecutor(len(stopped), thread_name_prefix="kafka-launch") as pool:
                    for future in [pool.submit(node.launch) for node in stopped]:
                        future.result()
            for node in self.nodes:
                node.wait_ready(self.ready_timeout)
        except BaseException:
            for node in self.nodes:
                node.kill()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self, *, keep_dir: bool | None = None, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM every node at once, wait (then SIGKILL), delete the data unless kept."""
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.wait_stopped(timeout)
        keep = self._keep_dir if keep_dir is None else keep_dir
        if self._owns_dir and not keep:
            shutil.rmtree(self.root, ignore_errors=True)

    def kill(self) -> None:
        for node in self.nodes:
            node.kill()

    async def astart(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def astop(self, *, keep_dir: bool | None = None) -> None:
        await asyncio.to_thread(lambda: self.stop(keep_dir=keep_dir))


# --------------------------------------------------------------------------- CLI


def _state_path() -> Path:
    return run_dir() / _STATE_FILE


def _read_state() -> dict[str, Any] | None:
    try:
        state = json.loads(_state_path().read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _state_alive(state: Mapping[str, Any]) -> bool:
    pid = state.get("pid")
    return isinstance(pid, int) and _pid_alive(pid) and _is_kafka_process(pid)


def _cmd_fetch(args: argparse.Namespace) -> int:
    began = time.monotonic()
    libs = fetch(force=args.force)
    print(f"{libs} ({time.monotonic() - began:.1f}s)")
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    state = _read_state()
    if state is not None and _state_alive(state):
        print(
            f"Kafka already running (pid {state['pid']}, dir {state['data_dir']})", file=sys.stderr
        )
        print(state["bootstrap"])
        return 0
    fetch()
    keep = args.dir is not None
    broker = LocalKafka(port=args.port, data_dir=args.dir, keep_dir=keep)
    print(f"Starting Kafka {KAFKA_VERSION} in {broker.data_dir} ...", file=sys.stderr)
    try:
        broker.start()
    except LocalKafkaError as exc:
        print(exc, file=sys.stderr)
        broker.stop()
        return 1
    pid = broker.detach()
    run_dir().mkdir(parents=True, exist_ok=True)
    state = {
        "pid": pid,
        "bootstrap": broker.bootstrap,
        "data_dir": str(broker.data_dir),
        "remove_dir_on_stop": not keep,
        "server_log": str(broker.server_log),
        "kafka_version": KAFKA_VERSION,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = _state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(_state_path())
    print(
        f"Kafka ready in {broker.startup_seconds or 0:.1f}s (pid {pid}); logs: {broker.server_log}",
        file=sys.stderr,
    )
    print(broker.bootstrap)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    state = _read_state()
    if state is None:
        print("No local Kafka broker recorded; nothing to stop.", file=sys.stderr)
        return 0
    if _state_alive(state):
        pid = int(state["pid"])
        _signal_group(pid, signal.SIGCONT)
        _signal_group(pid, signal.SIGTERM)
        if not _wait_pid_gone(pid, args.timeout):
            _signal_group(pid, signal.SIGKILL)
            _wait_pid_gone(pid, 30)
        print(f"Stopped Kafka (pid {pid}).", file=sys.stderr)
    else:
        print("Recorded Kafka broker is not running.", file=sys.stderr)
    if state.get("remove_dir_on_stop") and state.get("data_dir"):
        shutil.rmtree(str(state["data_dir"]), ignore_errors=True)
    _state_path().unlink(missing_ok=True)
    return 0


def _cmd_status(_args: argparse.Namespace) -> int:
    state = _read_state()
    if state is None or not _state_alive(state):
        print("not running")
        return 3
    try:
        meta = probe_metadata(str(state["bootstrap"]))
    except (OSError, ValueError, struct.error) as exc:
        print(f"pid {state['pid']} alive but not answering at {state['bootstrap']}: {exc!r}")
        return 1
    print(
        f"running: bootstrap={state['bootstrap']} pid={state['pid']} "
        f"cluster_id={meta.cluster_id} brokers={len(meta.brokers)} dir={state['data_dir']}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridgedev.localkafka",
        description=f"Run a local Apache Kafka {KAFKA_VERSION} broker (KRaft) on 127.0.0.1.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_fetch = sub.add_parser("fetch", help="download the broker jars (once)")
    p_fetch.add_argument("--force", action="store_true", help="download again")
    p_fetch.set_defaults(func=_cmd_fetch)
    p_start = sub.add_parser("start", help="start a background broker and print its bootstrap")
    p_start.add_argument("--port", type=int, default=None, help="client port (default: free)")
    p_start.add_argument(
        "--dir", default=None, help="data directory to use and keep (default: temporary)"
    )
    p_start.set_defaults(func=_cmd_start)
    p_stop = sub.add_parser("stop", help="stop the broker started with 'start'")
    p_stop.add_argument("--timeout", type=float, default=STOP_TIMEOUT_S)
    p_stop.set_defaults(func=_cmd_stop)
    p_status = sub.add_parser("status", help="report whether the broker runs and answers")
    p_status.set_defaults(func=_cmd_status)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except LocalKafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
