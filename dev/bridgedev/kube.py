"""A real Kubernetes API server on loopback, and the chart applied to it as a server-side
dry run: the server's own schemas, strict field validation and admission, which no offline
check has. `make kube` builds etcd, kube-apiserver and kubectl from the Go module proxy
(`dev/kube/go.mod`) into a per-user cache, with the Prometheus operator's CRDs beside them.

    python -m bridgedev.kube dry-run [--set KEY=VALUE ...]   # what `make k8s` runs
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bridgedev.localkafka import free_ports, repo_root

GO_MODULE = repo_root() / "dev" / "kube" / "go.mod"
BINARIES = ("etcd", "kube-apiserver", "kubectl")
#: The operator's CRDs for the chart's optional ServiceMonitor and PrometheusRule.
CRDS = ("monitoring.coreos.com_servicemonitors.yaml", "monitoring.coreos.com_prometheusrules.yaml")
NAMESPACE = "kaiko-bridge"
START_TIMEOUT_S = 180.0


class KubeError(RuntimeError):
    """The local API server could not be started or used."""


def cache_dir() -> Path:
    """Where `make kube` puts the binaries and CRDs: outside the clone, so a fresh clone
    (CI) finds them; `BRIDGE_KUBE_BIN` overrides it."""
    override = os.environ.get("BRIDGE_KUBE_BIN")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kaiko-bridge" / f"kube-{kube_version()}"


def kube_version() -> str:
    """The Kubernetes release `dev/kube/go.mod` requires (the cache is named after it)."""
    found = re.search(r"\bk8s\.io/kubernetes (v[0-9][^\s]*)", GO_MODULE.read_text())
    if found is None:
        raise KubeError(f"{GO_MODULE} requires no k8s.io/kubernetes version")
    return found.group(1)


def missing() -> list[str]:
    """What `make kube` has yet to build or copy (empty when the cache is complete)."""
    folder = cache_dir()
    return [name for name in (*BINARIES, *CRDS) if not (folder / name).is_file()]


def render_chart(helm: str, chart: Path, values: Sequence[str] = ()) -> str:
    """The chart's manifests as `helm template` renders them, every optional part on."""
    sets = ["serviceMonitor.enabled=true", "prometheusRule.enabled=true", "dashboard.enabled=true"]
    args = [helm, "template", "demo", str(chart), "--namespace", NAMESPACE]
    for value in [*sets, *values]:
        args += ["--set", value]
    done = subprocess.run(args, check=True, capture_output=True, text=True)  # noqa: S603 - no shell
    return done.stdout


@dataclass(frozen=True, slots=True)
class Applied:
    """What kubectl answered: its exit code and its output, one line per object."""

    returncode: int
    output: str


class KubeAPIServer:
    """etcd and kube-apiserver on 127.0.0.1, a static admin token, and kubectl for them."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.kubeconfig = workdir / "kubeconfig"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        gone = missing()
        if gone:
            raise KubeError(f"not built: {', '.join(gone)} in {cache_dir()} (`make kube`)")
        client, peer, secure = free_ports(3)
        self._spawn("etcd", *_etcd_args(self.workdir / "etcd", client, peer))
        token = os.urandom(16).hex()
        self._write_credentials(token, secure)
        self._spawn("kube-apiserver", *_apiserver_args(self.workdir, client, secure))
        self._wait_ready(secure, token)

    def stop(self) -> None:
        # One at a time, the API server before its store: without etcd it cannot finish.
        for proc in list(self._procs.values())[::-1]:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self._procs.clear()

    def kubectl(self, *args: str, stdin: str | None = None) -> Applied:
        """Run kubectl against this server; its combined output, never raised."""
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [str(cache_dir() / "kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        return Applied(done.returncode, (done.stdout + done.stderr).strip())

    def install_crds(self) -> None:
        """The Prometheus operator's CRDs, applied for real and waited for."""
        for crd in CRDS:
            self._must(self.kubectl("apply", "--server-side", "-f", str(cache_dir() / crd)))
        self._must(
            self.kubectl(
                "wait", "--for", "condition=Established", "--timeout", "60s", "crd", "--all"
            )
        )

    def create_namespace(self, name: str = NAMESPACE) -> None:
        self._must(self.kubectl("create", "namespace", name))

    def dry_run(self, manifests: str, namespace: str = NAMESPACE) -> Applied:
        """Apply `manifests` server-side with `--dry-run=server`: admitted and validated
        (unknown fields refused), but nothing stored."""
        return self.kubectl(
            "apply",
            "--server-side",
            "--dry-run=server",
            "--field-manager=kaiko-bridge",
            "--validate=strict",
            "--namespace",
            namespace,
            "-f",
            "-",
            stdin=manifests,
        )

    def _must(self, applied: Applied) -> None:
        if applied.returncode != 0:
            raise KubeError(applied.output)

    def _spawn(self, name: str, *args: str) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        with log:
            proc = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                [str(cache_dir() / name), *args], stdout=log, stderr=subprocess.STDOUT
            )
        self._procs[name] = proc

    def _write_credentials(self, token: str, secure: int) -> None:
        (self.workdir / "tokens.csv").write_text(f"{token},admin,admin,system:masters\n")
        _service_account_key(self.workdir / "sa.key")
        self.kubeconfig.write_text(
            "apiVersion: v1\nkind: Config\ncurrent-context: local\n"
            "clusters:\n- name: local\n  cluster:\n"
            f"    server: https://127.0.0.1:{secure}\n"
            f"    certificate-authority: {self.workdir / 'certs' / 'apiserver.crt'}\n"
            "contexts:\n- name: local\n  context: {cluster: local, user: admin}\n"
            f"users:\n- name: admin\n  user: {{token: {token}}}\n"
        )
        self.kubeconfig.chmod(0o600)

    def _wait_ready(self, secure: int, token: str) -> None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE  # its certificate is made as it starts
        request = urllib.request.Request(
            f"https://127.0.0.1:{secure}/readyz", headers={"Authorization": f"Bearer {token}"}
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise KubeError(f"{name} exited ({proc.returncode}):\n{self._logs()}")
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(request, timeout=5, context=context) as answer,  # noqa: S310 - https only
            ):
                if answer.status == 200:
                    return
            time.sleep(0.5)
        raise KubeError(f"not ready within {START_TIMEOUT_S:.0f}s:\n{self._logs()}")

    def _logs(self) -> str:
        tails = []
        for log in sorted(self.workdir.glob("*.log")):
            tails.append(f"--- {log.name}\n" + "\n".join(log.read_text().splitlines()[-20:]))
        return "\n".join(tails)


def _etcd_args(data: Path, client: int, peer: int) -> list[str]:
    return [
        "--name=local",
        f"--data-dir={data}",
        f"--listen-client-urls=http://127.0.0.1:{client}",
        f"--advertise-client-urls=http://127.0.0.1:{client}",
        f"--listen-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-advertise-peer-urls=http://127.0.0.1:{peer}",
        f"--initial-cluster=local=http://127.0.0.1:{peer}",
        "--unsafe-no-fsync",  # a throwaway store: durability buys nothing here
        "--log-level=warn",
    ]


def _apiserver_args(workdir: Path, etcd: int, secure: int) -> list[str]:
    key = workdir / "sa.key"
    return [
        f"--etcd-servers=http://127.0.0.1:{etcd}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        "--endpoint-reconciler-type=none",  # no `kubernetes` Service endpoint on loopback
        f"--secure-port={secure}",
        f"--cert-dir={workdir / 'certs'}",
        f"--token-auth-file={workdir / 'tokens.csv'}",
        "--authorization-mode=RBAC",
        "--service-cluster-ip-range=10.96.0.0/16",
        "--service-account-issuer=https://kubernetes.default.svc",
        f"--service-account-key-file={key}",
        f"--service-account-signing-key-file={key}",
        "--v=0",
    ]


def _service_account_key(path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


@contextlib.contextmanager
def running_server() -> Iterator[KubeAPIServer]:
    """A started server in a temporary directory, stopped and removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="kube-"))
    server = KubeAPIServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _cmd_dry_run(args: argparse.Namespace) -> int:
    manifests = render_chart(args.helm, args.chart, args.set)
    with running_server() as server:
        version = server.kubectl("version")
        print(version.output, flush=True)
        server.install_crds()
        server.create_namespace()
        applied = server.dry_run(manifests)
    print(applied.output)
    return applied.returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bridgedev.kube",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    dry = commands.add_parser("dry-run", help="apply the rendered chart with --dry-run=server")
    root = repo_root()
    dry.add_argument("--chart", type=Path, default=root / "deploy" / "helm" / "kaiko-bridge")
    dry.add_argument("--helm", default=str(root / ".cache" / "bin" / "helm"))
    dry.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    commands.add_parser("missing", help="list what `make kube` has yet to build")
    args = parser.parse_args(argv)
    try:
        if args.command == "missing":
            gone = missing()
            where = cache_dir()
            print(f"not cached in {where}: {', '.join(gone)}" if gone else f"cached in {where}")
            return 1 if gone else 0
        return _cmd_dry_run(args)
    except (KubeError, subprocess.CalledProcessError) as exc:
        detail = exc.stderr if isinstance(exc, subprocess.CalledProcessError) else exc
        print(f"error: {detail}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
