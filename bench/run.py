"""The benchmark suite: every scenario beside its baselines, one report.

    python bench/run.py [--out .cache/bench] [--quick] [--bootstrap HOST:PORT] [--against REF]

Starts one local Kafka broker (unless `--bootstrap` names one) and runs, one after the
other so they do not compete for the machine:

  bench/publish.py     the Publisher alone against raw aiokafka
  bench/nav.py         NAV WebSocket end to end; 1,000 sockets idle and at 1 msg/s each
  bench/vwap.py        Kaiko VWAP gRPC end to end
  bench/settlement.py  a settlement poll of 1,000 symbols

Each measures its baselines in the same run (the naive pipeline, raw aiokafka with
pre-serialized bytes, the receive stage alone). Writes `report.json` (every figure, plus
the machine and commit) and `report.txt` (the table, then each budget target met or
missed) to `--out`, and prints the table. Absolute figures drift on a shared machine;
compare the ratios. About 20 minutes; `--quick` is a smaller run to check the suite works.

`--profile` runs each script under py-spy (child processes included) and writes a flame
graph per script to `--out` (`<script>.svg`): where the time of every stage goes.

`--against REF` measures a change: every script also runs on a checkout of REF (a git
worktree under `--out`), the two alternating script by script on the same broker, and
the report ends with each scenario's figures side by side (`this / REF`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import kafka, table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

#: script -> (full-run arguments, quick-run arguments)
SUITE: dict[str, tuple[list[str], list[str]]] = {
    "publish.py": ([], ["--events", "10000", "--rounds", "1"]),
    "send_path.py": ([], ["--events", "10000", "--rounds", "1"]),
    "nav.py": (
        [],
        [
            *("--events", "20000", "--e2e-events", "20000", "--rounds", "1"),
            *("--latency-rounds", "1", "--seconds", "3"),
        ],
    ),
    "vwap.py": (
        [],
        ["--messages", "20000", "--rounds", "1", "--latency-rounds", "1", "--seconds", "3"],
    ),
    "settlement.py": ([], ["--symbols", "100", "--days", "10"]),
}


def git_commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],  # noqa: S607 - git from PATH, fixed args
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() or "unknown"


def run_script(
    script: str,
    extra: list[str],
    bootstrap: str,
    out: Path,
    *,
    profile: bool = False,
    root: Path = REPO,
) -> dict[str, Any]:
    """One benchmark in its own process, on the tree at `root` (its `bridge` package first on
    the path, for the script and its children); its output goes to `<out>/<script>.log`."""
    stem = Path(script).stem
    out.mkdir(parents=True, exist_ok=True)
    result, log = out / f"{stem}.json", out / f"{stem}.log"
    argv = [
        sys.executable,
        str(root / "bench" / script),
        *("--bootstrap", bootstrap, "--json", str(result)),
    ]
    if profile:
        flame = out / f"{stem}.svg"
        argv = [
            "py-spy",
            "record",
            "--subprocesses",
            "--rate",
            "200",
            "-o",
            str(flame),
            "--",
            *argv,
        ]
    print(f"running {script} on {'this tree' if root == REPO else root.name} ...", flush=True)
    began = time.monotonic()
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'dev'}"}
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(
            argv + extra, stdout=sink, stderr=subprocess.STDOUT, check=False, cwd=root, env=env
        )
    if done.returncode != 0:
        raise SystemExit(f"{script} failed (exit {done.returncode}); see {log}")
    print(f"  done in {time.monotonic() - began:.0f} s", flush=True)
    loaded: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").splitlines()[0],
        epilog="Writes report.json and report.txt to --out.",
    )
    parser.add_argument("--out", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--bootstrap", help="use this Kafka instead of starting a local one")
    parser.add_argument("--quick", action="store_true", help="small sizes: checks the suite runs")
    parser.add_argument(
        "--only", action="append", choices=sorted(SUITE), help="run only this script"
    )
    parser.add_argument("--profile", action="store_true", help="flame graphs with py-spy")
    parser.add_argument(
        "--against", metavar="REF", help="also run on a checkout of REF, alternating, and compare"
    )
    args = parser.parse_args()
    args.out = args.out.resolve()  # the other tree's scripts run from their own directory
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "commit": git_commit(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "load_average_at_start": os.getloadavg(),
        },
        "quick": args.quick,
        "scenarios": [],
        "raw": {},
    }
    other: dict[str, Any] = {"commit": args.against, "scenarios": [], "raw": {}}
    with kafka(args.bootstrap) as bootstrap, worktree(args.against, args.out) as ref_root:
        scripts = [s for s in SUITE if not args.only or s in args.only]
        for turn, script in enumerate(scripts):
            full, quick = SUITE[script]
            sizes = quick if args.quick else full
            trees = [(REPO, report, args.out)]
            if ref_root is not None:  # alternate which goes first: neither always warms up
                trees.append((ref_root, other, args.out / "against"))
                trees = trees[::-1] if turn % 2 else trees
            for root, into, out in trees:
                if not (root / "bench" / script).exists():
                    print(f"{script}: not in {root.name}, skipped there", flush=True)
                    continue
                result = run_script(script, sizes, bootstrap, out, profile=args.profile, root=root)
                into["scenarios"] += result["scenarios"]
                into["raw"][script] = result["raw"]
    report["machine"]["load_average_at_end"] = os.getloadavg()
    text = table(report["scenarios"])
    if args.against:
        report["against"] = other
        text += f"\n\n{args.against}, in the same run:\n{table(other['scenarios'])}"
        text += f"\n\nthis / {args.against}:\n{side_by_side(report['scenarios'], other)}"
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "report.txt").write_text(text + "\n", encoding="utf-8")
    print()
    print(text)
    print(f"\nreport: {args.out / 'report.json'}  table: {args.out / 'report.txt'}")


@contextlib.contextmanager
def worktree(ref: str | None, out: Path) -> Iterator[Path | None]:
    """A detached checkout of `ref` under `out` for the run (None without a ref)."""
    if ref is None:
        yield None
        return
    path = (out / "against-tree").resolve()
    git = ["git", "-C", str(REPO)]
    subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)
    subprocess.run([*git, "worktree", "add", "--detach", str(path), ref], check=True)
    try:
        yield path
    finally:
        subprocess.run([*git, "worktree", "remove", "--force", str(path)], check=False)


def _keys(scenarios: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Each row's name with the top-level row it belongs to: baselines share names."""
    keys, parent = [], ""
    for s in scenarios:
        if not s["name"].startswith(" "):
            parent = s["name"]
        keys.append((parent, s["name"]))
    return keys


def side_by_side(this: list[dict[str, Any]], other: dict[str, Any]) -> str:
    """Each scenario's events/s and p99 here and in the other run, with their ratio."""
    theirs = dict(zip(_keys(other["scenarios"]), other["scenarios"], strict=True))
    lines = []
    for key, s in zip(_keys(this), this, strict=True):
        o = theirs.get(key)
        if o is None:
            continue
        parts = [f"{s['name'][:50]:<50}"]
        if s["events_per_s"] and o["events_per_s"]:
            ratio = s["events_per_s"] / o["events_per_s"]
            parts.append(
                f"events/s {s['events_per_s']:>9,.0f} vs {o['events_per_s']:>9,.0f} = {ratio:.2f}x"
            )
        for baseline, ratio in s["ratios"].items():
            if ratio is not None and o["ratios"].get(baseline) is not None:
                parts.append(f"x {baseline} {ratio:.2f} vs {o['ratios'][baseline]:.2f}")
        if s["latency"] and o["latency"]:
            parts.append(f"p99 {s['latency']['p99_ms']:.1f} vs {o['latency']['p99_ms']:.1f} ms")
        if len(parts) > 1:
            lines.append("  ".join(parts))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
