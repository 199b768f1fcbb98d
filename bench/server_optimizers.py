"""Time to accuracy: adaptive server optimizers (FedAdagrad, FedAdam, FedYogi) vs the plain step.

FedBuff over the real broker, one configuration after another with the same seeds, data splits
and device speeds: wall-clock seconds and uploads until the global model first reaches the
target test accuracy, on digits under Dirichlet(0.1) and on the synthetic data set (its own
per-device split). Each optimizer runs with its default ``server_lr``
(:data:`fedmqtt.aggregation.serveropt.DEFAULT_SERVER_LR`) unless ``--server-lr`` is given.

    .venv/bin/python -m bench.server_optimizers [--seeds 0,1,2] [--duration 60]
        [--optimizers sgd,adagrad,adam,yogi] [--datasets digits,synthetic]
        [--json bench/results/server_optimizers.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench._sim import fmt, machine, run
from simulator.runner import SimConfig

SETTINGS: dict[str, dict[str, Any]] = {
    "digits": {"dataset": "digits", "partition": "dirichlet:0.1", "target": 0.90},
    "synthetic": {"dataset": "synthetic", "partition": "iid", "target": 0.75},
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--optimizers", default="sgd,adagrad,adam,yogi")
    ap.add_argument("--datasets", default="digits,synthetic")
    ap.add_argument("--server-lr", type=float, default=None)
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: list[dict[str, Any]] = []
    for name in args.datasets.split(","):
        setting = SETTINGS[name]
        for opt in args.optimizers.split(","):
            for seed in seeds:
                cfg = SimConfig(
                    dataset=setting["dataset"],
                    partition=setting["partition"],
                    clients=args.clients,
                    codec="int8",
                    duration=args.duration,
                    target_accuracy=setting["target"],
                    stop_at_target=True,
                    quiet=True,
                    seed=seed,
                    server_opt=opt,
                    server_lr=args.server_lr,
                )
                s = run(cfg)
                row = {
                    "dataset": name,
                    "partition": setting["partition"],
                    "target": setting["target"],
                    "optimizer": opt,
                    "server_lr": args.server_lr,
                    "seed": seed,
                    "time_to_target_s": s["time_to_target_s"],
                    "uploads_to_target": s["uploads_to_target"],
                    "versions": s["versions"],
                    "final_accuracy": s["final_accuracy"],
                    "wall_s": s["wall_s"],
                }
                results.append(row)
                print(
                    f"{name} {opt} seed {seed}: {fmt(row['time_to_target_s'])} s, "
                    f"accuracy {fmt(row['final_accuracy'], 3)}",
                    file=sys.stderr,
                )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": machine(), "runs": results}, indent=1))
    print(f"machine: {machine()}")
    print(
        f"setting: FedBuff, {args.clients} agents, int8 uplink, seeds {args.seeds}, "
        f"at most {args.duration:.0f} s per run\n"
    )
    print(
        "| data set (target) | server optimizer | seconds to target per seed | median | "
        "uploads to target (median) | accuracy at stop (mean) |"
    )
    print("|---|---|---|---:|---:|---:|")
    for name in args.datasets.split(","):
        for opt in args.optimizers.split(","):
            rows = [r for r in results if r["dataset"] == name and r["optimizer"] == opt]
            times = [r["time_to_target_s"] for r in rows]
            reached = [t for t in times if t is not None]
            median = statistics.median(reached) if len(reached) == len(times) else None
            uploads = [r["uploads_to_target"] for r in rows if r["uploads_to_target"] is not None]
            acc = statistics.mean(r["final_accuracy"] or 0.0 for r in rows)
            print(
                f"| {name} ({SETTINGS[name]['target']}) | {opt} | "
                f"{', '.join(fmt(t) for t in times)} | {fmt(median)} | "
                f"{fmt(statistics.median(uploads) if len(uploads) == len(rows) else None)} | "
                f"{acc:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
