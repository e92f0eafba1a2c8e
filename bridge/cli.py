"""`kaiko-bridge` command line: run · demo · replay · completeness · topics · check-config ·
schemas.

Exit codes: 0 done, 1 runtime failure, 2 bad configuration or usage, 3 `completeness`
found data missing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from bridge import __version__
from bridge.configfile import check_files, load_settings, nothing_to_run
from bridge.errors import BridgeError, ConfigError

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2
#: The demo (local Kafka, simulators) is development tooling, not part of the wheel.
DEMO_FROM_A_CHECKOUT = (
    "kaiko-bridge demo runs from a checkout of the source (it needs the dev/ tools, "
    "config/demo.yaml and tools/kafka): clone the repository, then run `make demo` in it"
)

DESCRIPTION = """\
Carries Vinter NAV (WebSocket + REST) and Kaiko VWAP (gRPC) data onto Kafka as
schema-versioned CloudEvents, keyed by symbol.

configuration: a YAML file (see config/example.yaml); any key can be overridden from the
environment as KAIKO_BRIDGE__SECTION__KEY, e.g. KAIKO_BRIDGE__KAFKA__BOOTSTRAP_SERVERS.
Secrets may be given as {file: PATH} or {env: NAME}; they are never printed.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kaiko-bridge",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the bridge (production entry point)")
    run.add_argument(
        "--config", "-c", type=Path, required=True, help="YAML settings file (required)"
    )

    demo = sub.add_parser(
        "demo", help="local Kafka + simulated upstreams + the bridge, with a live view"
    )
    demo.add_argument("--seconds", type=float, help="stop by itself after this long")

    check = sub.add_parser(
        "check-config",
        help="validate a settings file and read every file it names; exit 2 if invalid",
    )
    check.add_argument("config", type=Path, help="YAML settings file")
    check.add_argument(
        "--skip-files",
        action="store_true",
        help="do not read the secret and CA files it names (a file for another machine)",
    )

    from bridge.replay import add_arguments as replay_arguments

    replay = sub.add_parser(
        "replay", help="replay topics by offset or time to a file, stdout or another topic"
    )
    replay_arguments(replay)

    from bridge.completeness_cli import add_arguments as completeness_arguments

    completeness = sub.add_parser(
        "completeness",
        help="per key, the intervals missing from topics between two times (exit 1 if any)",
    )
    completeness_arguments(completeness)

    from bridge.topics import add_arguments as topics_arguments

    topics = sub.add_parser(
        "topics", help="list topics with their partitions and end offsets (what replay reads)"
    )
    topics_arguments(topics)

    schemas = sub.add_parser("schemas", help="list the event schemas, or print one")
    schemas.add_argument("type", nargs="?", help="event type, e.g. vinter.nav.tick")
    schemas.add_argument("--version", dest="schema_version", type=int, help="default: latest")
    return parser


def _check_config(path: Path, *, skip_files: bool) -> int:
    settings = load_settings(path, read_files=not skip_files)
    if not skip_files:
        check_files(settings)
    print(f"{path}: valid" + (" (files not read)" if skip_files else ""))
    if nothing_to_run(settings):
        print(
            "kaiko-bridge: warning: nothing is configured to run (no vinter.symbols, "
            "kaiko.subscriptions or settlement.symbols)",
            file=sys.stderr,
        )
    print(f"  kafka: {settings.kafka.bootstrap_servers} ({settings.kafka.security_protocol})")
    print(f"  vinter websocket symbols: {len(settings.vinter.symbols)}")
    print(f"  kaiko vwap subscriptions: {len(settings.kaiko.subscriptions)}")
    print(f"  settlement symbols: {len(settings.settlement.symbols)}")
    return EXIT_OK


def _schemas(event_type: str | None, version: int | None) -> int:
    from bridge import validation

    available = validation.available()
    if event_type is None:
        for name, shipped in available.items():
            print(f"{name}: versions {', '.join(map(str, shipped))}")
        return EXIT_OK
    versions = available.get(event_type)
    if versions is None:
        known = ", ".join(available)
        print(f"kaiko-bridge: no event type {event_type!r}; known: {known}", file=sys.stderr)
        return EXIT_CONFIG
    if version is not None and version not in versions:
        listed = ", ".join(map(str, versions))
        print(
            f"kaiko-bridge: {event_type} has no version {version}; versions: {listed}",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    schema = validation.load_schema(event_type, version or versions[-1])
    import json

    print(json.dumps(schema, indent=2))
    return EXIT_OK


def _demo(seconds: float | None) -> int:
    try:
        from bridgedev.demo import run_demo
    except ImportError:
        print(DEMO_FROM_A_CHECKOUT, file=sys.stderr)
        return EXIT_CONFIG
    return run_demo(seconds=seconds)


def _kafka_tool(args: argparse.Namespace) -> int:
    """replay, completeness and topics: readers of Kafka, quiet about aiokafka's retries."""
    from bridge import logs

    logs.configure("WARNING", "text")  # aiokafka's retries are not the user's to read
    if args.command == "replay":
        from bridge.replay import run as run_replay

        return run_replay(args)
    if args.command == "completeness":
        from bridge.completeness_cli import run as run_completeness

        return run_completeness(args)
    from bridge.topics import run as run_topics

    return run_topics(args, sys.stdout)


def _dispatch(args: argparse.Namespace) -> int:
    if args.command in ("replay", "topics", "completeness"):
        return _kafka_tool(args)
    if args.command == "check-config":
        return _check_config(args.config, skip_files=args.skip_files)
    if args.command == "schemas":
        return _schemas(args.type, args.schema_version)
    if args.command == "demo":
        return _demo(args.seconds)
    from bridge.app import run_service

    settings = load_settings(args.config)
    check_files(settings)
    if nothing_to_run(settings):
        raise ConfigError(
            "",
            f"{args.config}: nothing is configured to run (no vinter.symbols, "
            "kaiko.subscriptions or settlement.symbols)",
        )
    return run_service(settings)


def main(argv: Sequence[str] | None = None) -> int:
    from bridge.replay_args import joined_times

    args = _parser().parse_args(joined_times(list(sys.argv[1:] if argv is None else argv)))
    try:
        return _dispatch(args)
    except ConfigError as exc:
        print(f"kaiko-bridge: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BridgeError as exc:
        print(f"kaiko-bridge: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
