"""The benchmark suite: every scenario beside its baselines, one report.

    python bench/run.py [--out .cache/bench] [--quick] [--bootstrap HOST:PORT]

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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import kafka, table

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

#: script -> (full-run arguments, quick-run arguments)
SUITE: dict[str, tuple[list[str], list[str]]] = {
    "publish.py": ([], ["--events", "10000", "--rounds", "1"]),
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
    script: str, extra: list[str], bootstrap: str, out: Path, *, profile: bool = False
) -> dict[str, Any]:
    """One benchmark in its own process; its output goes to `<out>/<script>.log`."""
    stem = Path(script).stem
    result, log = out / f"{stem}.json", out / f"{stem}.log"
    argv = [sys.executable, str(BENCH / script), "--bootstrap", bootstrap, "--json", str(result)]
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
    print(f"running {script} ...", flush=True)
    began = time.monotonic()
    with log.open("w", encoding="utf-8") as sink:
        done = subprocess.run(argv + extra, stdout=sink, stderr=subprocess.STDOUT, check=False)
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
    args = parser.parse_args()
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
    with kafka(args.bootstrap) as bootstrap:
        for script, (full, quick) in SUITE.items():
            if args.only and script not in args.only:
                continue
            sizes = quick if args.quick else full
            result = run_script(script, sizes, bootstrap, args.out, profile=args.profile)
            report["scenarios"] += result["scenarios"]
            report["raw"][script] = result["raw"]
    report["machine"]["load_average_at_end"] = os.getloadavg()
    text = table(report["scenarios"])
    (args.out / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (args.out / "report.txt").write_text(text + "\n", encoding="utf-8")
    print()
    print(text)
    print(f"\nreport: {args.out / 'report.json'}  table: {args.out / 'report.txt'}")


if __name__ == "__main__":
    main()
