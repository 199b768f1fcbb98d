"""``fedmqtt simulate --model autoencoder``: one evaluated federation of autoencoders.

The run and its evaluation are :func:`simulator.anomaly_eval.evaluate`; this module maps the
simulator's options onto it, refuses the options the autoencoder path does not support, and
prints (and optionally writes) the JSON report.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from fedmqtt.errors import ConfigError
from simulator.anomaly_eval import DATASETS, Setup, evaluate

# Options of the supervised simulator that this path does not implement, and their neutral
# values: a run asking for one of them is refused rather than silently ignoring it.
_UNSUPPORTED: dict[str, Any] = {
    "stragglers": 0.0,
    "dropout": 0.0,
    "attackers": 0.0,
    "robust": "none",
    "target_accuracy": None,
    "stop_at_target": False,
    "downlink_delta": None,
    "personalise": None,
    "participation": 1.0,
    "gate": False,
    "eval_fraction": 0.0,
    "broker": None,
    "plot": None,
    "dp": "off",
}


def setup_from_args(args: argparse.Namespace) -> Setup:
    """The :class:`Setup` of ``fedmqtt simulate --model autoencoder`` options."""
    if args.model != "autoencoder":
        raise ConfigError("--dataset sensors needs --model autoencoder (it has no labels)")
    if args.dataset not in DATASETS:
        raise ConfigError(f"--model autoencoder needs --dataset {' | '.join(DATASETS)}")
    for name, neutral in _UNSUPPORTED.items():
        if getattr(args, name, neutral) != neutral:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag} is not supported with --model autoencoder")
    if args.strategy not in ("fedbuff", "fedasync"):
        raise ConfigError("--model autoencoder runs with --strategy fedbuff or fedasync")
    if args.clients < 1 or args.bottleneck < 1:
        raise ConfigError("--clients and --bottleneck must be at least 1")
    if args.versions is not None and args.versions < 1:
        raise ConfigError("--versions must be at least 1")
    strategy: dict[str, Any] = {"name": args.strategy}
    if args.server_opt is not None:
        strategy["server_optimizer"] = args.server_opt
    if args.server_lr is not None:
        strategy["server_lr"] = args.server_lr
    return Setup(
        devices=args.clients,
        hidden=args.hidden[0],
        bottleneck=args.bottleneck,
        versions=args.versions,
        quantile=args.quantile,
        plan=(
            ("epochs", args.epochs),
            ("lr", args.lr),
            ("batch_size", args.batch_size),
            ("momentum", 0.9),
            ("codec", args.codec),
        ),
        buffer_size=args.buffer_size,
        downlink=args.downlink_codec or "int8",
        strategy=tuple(strategy.items()),
        timeout_s=args.duration,
        require_versions=False,
        central_10x=False,
    )


def run(args: argparse.Namespace, out: TextIO | None = None) -> dict[str, Any]:
    """Run and evaluate the federation; print the report as JSON (and write ``--json``)."""
    setup = setup_from_args(args)
    out = out if out is not None else sys.stdout
    with contextlib.ExitStack() as stack:
        workdir = args.workdir
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fedmqtt-ae-")))
        workdir.mkdir(parents=True, exist_ok=True)
        split = "stream" if args.dataset == "sensors" else args.partition
        row = evaluate(args.dataset, split, args.seed, workdir, setup)
    row["model"] = {
        "kind": "autoencoder",
        "hidden": setup.hidden,
        "bottleneck": setup.bottleneck,
        "quantile": setup.quantile,
    }
    row["plan"] = setup.plan_dict
    row["strategy"] = dict(setup.strategy)
    row["downlink"] = setup.downlink
    text = json.dumps(row, indent=1)
    if args.json is not None:
        args.json.write_text(text + "\n")
    if not args.quiet:
        print(text, file=out)
    return row
