"""The ``edge-agent`` command: ``run``, ``check`` and ``predict``.

``run`` is the systemd ``ExecStart``: it logs to stderr (journald adds timestamps, so none are
printed when ``$JOURNAL_STREAM`` says we are under systemd), talks ``Type=notify`` through
``$NOTIFY_SOCKET``, and stops cleanly on SIGTERM or SIGINT. Exit status: 0 after a clean
stop, 78 (``EX_CONFIG``) when the config or a key is wrong, so that a unit with
``RestartPreventExitStatus=78`` does not restart-loop on a mistake that only a person can fix,
and 1 on any other failure (which systemd should restart).

Heavy modules are imported inside the sub-commands: ``predict`` alone loads onnxruntime.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import TextIO

EXIT_CONFIG = 78


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="fedmqtt edge agent: federated learning on this device over MQTT.",
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the agent (systemd ExecStart)")
    run.add_argument("--config", required=True, type=Path, help="path to agent.toml")
    run.add_argument(
        "--log-level", default=None, help="override [logging] level (DEBUG, INFO, WARNING, ERROR)"
    )
    check = sub.add_parser("check", help="validate config, keys, data and broker; exit 0/1")
    check.add_argument("--config", required=True, type=Path, help="path to agent.toml")
    check.add_argument(
        "--no-broker",
        action="store_true",
        help="skip the broker connection check (e.g. when provisioning offline)",
    )
    pred = sub.add_parser("predict", help="predict CSV rows with the last verified model")
    pred.add_argument("--config", required=True, type=Path, help="path to agent.toml")
    pred.add_argument("--input", required=True, type=Path, help="CSV file of feature rows")
    pred.add_argument("--format", default="csv", choices=("csv", "json"), dest="output_format")
    pred.add_argument(
        "--threshold",
        default="global",
        choices=("global", "local"),
        help="autoencoders: decide with the federated threshold or this device's own",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return cmd_run(args.config, args.log_level)
    if args.command == "check":
        from edge_agent.check import run_check

        return run_check(args.config, sys.stdout, broker=not args.no_broker)
    return cmd_predict(args.config, args.input, args.output_format, sys.stdout, args.threshold)


def setup_logging(level: str) -> None:
    fmt = "%(levelname)s %(name)s: %(message)s"
    if not os.environ.get("JOURNAL_STREAM"):
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr, force=True)
    logging.getLogger("paho").setLevel(logging.WARNING)


def cmd_run(config_path: Path, log_level: str | None) -> int:
    from edge_agent.config import load_config
    from fedmqtt.errors import ConfigError

    try:
        config = load_config(config_path)
    except ConfigError as e:
        print(f"edge-agent: configuration error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging((log_level or config.logging.level).upper())
    log = logging.getLogger("edge_agent")

    from edge_agent.agent import EdgeAgent
    from edge_agent.state import StateDirLockedError
    from fedmqtt.sdnotify import Notifier

    try:
        agent = EdgeAgent(config, notifier=Notifier.from_env())
    except ConfigError as e:
        log.error("configuration error: %s", e)
        return EXIT_CONFIG
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.run(stop)
    except StateDirLockedError as e:
        log.error("%s", e)
        return 1
    except Exception:
        log.exception("edge agent failed")
        return 1
    return 0


def cmd_predict(
    config_path: Path, input_path: Path, output_format: str, out: TextIO, threshold: str = "global"
) -> int:
    try:
        from edge_agent import predictor
    except ImportError as e:
        print(
            f"edge-agent predict is not available: the module edge_agent.predictor could not "
            f"be imported ({e})",
            file=sys.stderr,
        )
        return 2
    return predictor.predict_cli(config_path, input_path, output_format, out, threshold=threshold)
