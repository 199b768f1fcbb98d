"""Bytes to accuracy per codec: how much devices upload before the model is good enough.

digits, 20 agents, Dirichlet(0.5), FedBuff; one run per codec with the same seed, stopping
when the target accuracy is first reached. Also reports each codec's final accuracy after the
full duration when --full is given.

    .venv/bin/python -m bench.bytes_to_accuracy [--target 0.90] [--duration 60]
"""

from __future__ import annotations

import argparse
import sys

from bench._sim import fmt, machine, run
from simulator.runner import SimConfig

CODECS = ("raw", "fp16", "int8", "topk:0.1", "topk:0.01", "topk:0.01+zlib")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--codecs", default=",".join(CODECS))
    args = ap.parse_args()
    rows = []
    for codec in args.codecs.split(","):
        cfg = SimConfig(
            dataset="digits",
            partition="dirichlet:0.5",
            clients=args.clients,
            codec=codec,
            duration=args.duration,
            target_accuracy=args.target,
            stop_at_target=True,
            quiet=True,
            seed=args.seed,
            compute_time=0.1,
        )
        s = run(cfg)
        rows.append((codec, s))
        print(f"{codec}: {s['bytes_to_target']} bytes", file=sys.stderr)
    print(f"machine: {machine()}")
    print(
        f"setting: digits, {args.clients} agents, Dirichlet(0.5), FedBuff, "
        f"target {args.target}, seed {args.seed}\n"
    )
    print(
        "| codec | bytes to target | x fewer than raw | uploads to target | bytes / upload |"
        " seconds to target |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    raw = dict(rows).get("raw", {}).get("bytes_to_target")
    for codec, s in rows:
        b, u = s["bytes_to_target"], s["uploads_to_target"]
        ratio = f"{raw / b:.1f}" if raw and b else "-"
        per = f"{b / u:.0f}" if b and u else "-"
        print(f"| {codec} | {fmt(b)} | {ratio} | {fmt(u)} | {per} | {fmt(s['time_to_target_s'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
