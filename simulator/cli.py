"""The ``fedmqtt`` console command: ``fedmqtt demo`` and ``fedmqtt simulate``.

It lives in the simulator package because both subcommands drive the simulator, which depends
on the services; the core (``fedmqtt/``) never imports this layer (the layer contracts in
pyproject.toml, checked by ``scripts/check``). The runner and the demo are imported only when
their subcommand runs, so ``fedmqtt --help`` stays quick.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from fedmqtt.errors import FedMQTTError


def _fraction(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("must be a fraction between 0 and 1")
    return v


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("must be widths such as 32 or 64,32") from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError("every width must be at least 1")
    return widths


def add_simulation_options(p: argparse.ArgumentParser) -> None:
    """The simulator's options. Their names are a contract: scripts and docs use them."""
    p.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "breast_cancer", "wine", "synthetic", "sensors"],
        help="with --model autoencoder: digits | breast_cancer (novelty variants) | sensors",
    )
    p.add_argument(
        "--model", default="softmax", choices=["softmax", "mlp", "linear", "autoencoder"]
    )
    p.add_argument(
        "--bottleneck",
        type=int,
        default=4,
        help="bottleneck width of --model autoencoder (default 4; its hidden layers: the "
        "first --hidden width)",
    )
    p.add_argument(
        "--quantile",
        type=_fraction,
        default=0.98,
        help="--model autoencoder: the quantile of normal scores the threshold estimates "
        "(default 0.98)",
    )
    p.add_argument("--clients", type=int, default=10, help="number of agents (default 10)")
    p.add_argument(
        "--partition",
        default="dirichlet:0.5",
        help="iid | dirichlet:BETA | shards:K (default dirichlet:0.5)",
    )
    p.add_argument("--strategy", default="fedbuff", choices=["fedbuff", "fedasync", "fedavg"])
    p.add_argument(
        "--codec", default="int8", help="raw | fp16 | int8 | int4 | topk:FRACTION[+int8] [+zlib]"
    )
    p.add_argument(
        "--downlink-codec",
        default=None,
        help="codec of the published model: raw | fp16 | int8 | int4 (default: the aggregator's)",
    )
    p.add_argument(
        "--downlink-delta",
        default=None,
        help="send versions as deltas from a keyframe in this codec, e.g. topk:0.05+zlib "
        "(default: full models only)",
    )
    p.add_argument(
        "--hidden",
        type=_widths,
        default=(32,),
        help="hidden layer widths of --model mlp, comma-separated (default 32)",
    )
    p.add_argument(
        "--stragglers",
        type=_fraction,
        default=0.0,
        help="fraction of devices 10x slower (default 0)",
    )
    p.add_argument(
        "--dropout",
        type=_fraction,
        default=0.0,
        help="fraction of devices that go offline for a while and come back",
    )
    p.add_argument(
        "--attackers",
        type=_fraction,
        default=0.0,
        help="fraction of devices that poison their updates",
    )
    p.add_argument(
        "--attack", default="signflip", choices=["signflip", "scale", "noise", "labelflip"]
    )
    p.add_argument(
        "--attacker-rate",
        type=float,
        default=1.0,
        metavar="R",
        help="attackers send R times as often as an honest device, each update with a fresh "
        "id, without waiting for a new version (default 1: like honest devices)",
    )
    p.add_argument(
        "--server-opt",
        default=None,
        metavar="NAME",
        help="server optimizer: sgd | adagrad | adam | yogi (default: the aggregator's, sgd)",
    )
    p.add_argument(
        "--server-lr",
        type=float,
        default=None,
        help="server learning rate (default: the server optimizer's)",
    )
    p.add_argument(
        "--personalise",
        default=None,
        metavar="MODE",
        help="each agent keeps a personal model: off | head | finetune (default: off)",
    )
    p.add_argument(
        "--participation",
        type=_fraction,
        default=1.0,
        help="fraction of devices the plan selects to train in each participation window; the "
        "others only receive the model (default 1: every device trains)",
    )
    p.add_argument(
        "--participation-window",
        type=int,
        default=1,
        metavar="W",
        help="versions per participation window (default 1)",
    )
    p.add_argument(
        "--attack-start",
        type=float,
        default=0.0,
        metavar="S",
        help="seconds into the run at which the attackers switch on (default 0: from the start)",
    )
    p.add_argument(
        "--gate",
        action="store_true",
        help="the aggregator's evaluation gate: only versions that score within --gate-margin of "
        "the best recent one are released, worse ones are rolled back ([rollout] gate)",
    )
    p.add_argument(
        "--gate-margin",
        type=float,
        default=0.02,
        metavar="M",
        help="accuracy points a version may lose against the best recent one (default 0.02)",
    )
    p.add_argument("--robust", default="none", choices=["none", "clip", "trimmed-mean", "median"])
    p.add_argument(
        "--duration",
        type=float,
        default=60.0,
        help="seconds to run at most (default 60)",
    )
    p.add_argument(
        "--versions",
        type=int,
        default=None,
        metavar="N",
        help="end the run once the global model reaches version N (--duration still caps it)",
    )
    p.add_argument(
        "--target-accuracy",
        type=float,
        default=None,
        help="report time and uploads to reach this test accuracy",
    )
    p.add_argument(
        "--stop-at-target",
        action="store_true",
        help="end the run as soon as --target-accuracy is reached",
    )
    p.add_argument(
        "--buffer-size",
        type=int,
        default=None,
        help="FedBuff K / FedAvg updates per round (default: clients/2, clients)",
    )
    p.add_argument(
        "--compute-time",
        type=float,
        default=0.3,
        help="median emulated seconds of local training per round (default 0.3)",
    )
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--lr", type=float, default=0.1, help="local learning rate (default 0.1)")
    p.add_argument("--batch-size", type=int, default=16, help="local batch size (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--eval-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="each device keeps a validation split of this fraction of its samples, never "
        "trained on, and reports its evaluation of every version (0: off; at most 0.5)",
    )
    p.add_argument(
        "--agent-processes",
        type=int,
        default=0,
        metavar="P",
        help="processes hosting the agents (default 0: automatic -- all in this "
        "process up to 50 agents, then one process per 100 agents)",
    )
    p.add_argument(
        "--broker",
        default=None,
        metavar="HOST:PORT",
        help="use this broker instead of starting a local Mosquitto",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="keep state, keys and logs here (default: a temporary directory)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the summary here")
    p.add_argument("--plot", type=Path, default=None, help="write a PNG of accuracy curves here")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    from simulator.privacy import add_options

    add_options(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmqtt", description="Federated learning over MQTT: simulations and the demo."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    sim = sub.add_parser("simulate", help="run a federation on one machine over a real broker")
    add_simulation_options(sim)
    demo = sub.add_parser("demo", help="a one-minute default federation, explained")
    demo.add_argument("--duration", type=float, default=60.0)
    demo.add_argument("--workdir", type=Path, default=None)
    demo.add_argument("--broker", default=None, metavar="HOST:PORT")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if args.command == "simulate" and (
            args.model == "autoencoder" or args.dataset == "sensors"
        ):
            from simulator.anomaly_cli import run as run_anomaly

            run_anomaly(args)
            return 0
        if args.command == "simulate":
            from simulator.runner import SimConfig, run_simulation

            summary = run_simulation(SimConfig.from_args(args))
            return 0 if summary.get("error") is None else 1
        from simulator.demo import run_demo

        return run_demo(duration=args.duration, workdir=args.workdir, broker=args.broker)
    except FedMQTTError as e:
        print(f"fedmqtt: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
