"""Personalisation: per-device accuracy on each device's own validation split, personal vs global.

digits split over 20 devices by Dirichlet(0.1) (each device sees few classes). Every device
keeps 20 % of its shard as its local validation split and trains on the rest. The federation
runs synchronous FedAvg rounds (every device, weighted by shard size) for ``--rounds`` rounds;
after each round every device builds its personal model with the agent's own code
(:func:`edge_agent.personal.build`, the function ``edge-agent run`` calls), ``head`` mode
continuing from its previous head. At the end, each device's accuracy on its validation split:

* global: the final global model;
* finetune / head: the device's personal model of that mode;
* local only: a model trained on the device's training split alone (the same epochs in total).

The table gives, across devices, the 10th percentile, the median and the mean, per seed and
pooled over the seeds. The federation is run in-process (no broker) so that the measurement is
only the learning; tests/test_personal_e2e.py runs the same code over a real broker.

    .venv/bin/python -m bench.personalisation [--seeds 0,1,2] [--rounds 30] [--model softmax]
        [--json bench/results/personalisation.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench._sim import machine
from edge_agent.personal import PersonalModel, build
from fedmqtt import wire
from fedmqtt.models import TrainConfig, build_model, init_params, train_local
from fedmqtt.params import Params
from fedmqtt.personalise import DEFAULT_HEAD_EPOCHS
from fedmqtt.rand import LightRandom
from simulator.runner import SimConfig, federation_data

METHODS = ("global", "finetune", "head", "local only")


def split(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Train and validation indices of a shard of ``n`` (at least one of each)."""
    perm = rng.permutation(n)
    n_val = min(n - 1, max(1, round(0.2 * n)))
    return perm[n_val:], perm[:n_val]


def run_seed(seed: int, args: argparse.Namespace) -> dict[str, list[float]]:
    cfg = SimConfig(
        dataset="digits",
        model=args.model,
        clients=args.clients,
        partition=args.partition,
        seed=seed,
        hidden=(32,),
    )
    data = federation_data(cfg)
    spec = data.spec
    rng = np.random.default_rng(seed)
    devices = []
    for X_dev, y_dev in data.shards:  # the simulator's own split of the training set
        tr, va = split(len(y_dev), rng)
        devices.append((X_dev[tr], y_dev[tr], X_dev[va], y_dev[va]))
    train = TrainConfig(epochs=args.epochs, lr=args.lr, batch_size=16, momentum=0.9)
    params: Params = init_params(spec, np.random.default_rng(seed))
    personal: dict[str, list[PersonalModel | None]] = {
        m: [None] * len(devices) for m in ("finetune", "head")
    }
    weights = np.array([len(d[0]) for d in devices], dtype=np.float64)
    weights /= weights.sum()
    for r in range(args.rounds):
        model = wire.GlobalModel("bench", "aggregator", r + 1, spec, params, created_at=0.0)
        new = []
        for i, (X, y, _, _) in enumerate(devices):
            trained, _ = train_local(
                spec, params, X, y, train, LightRandom(seed * 7919 + r * 101 + i)
            )
            new.append(trained)
            for mode in ("finetune", "head"):
                personal[mode][i] = build(
                    mode,
                    model,
                    trained,
                    personal[mode][i],
                    (X, y),
                    train=train,
                    head_epochs=DEFAULT_HEAD_EPOCHS,
                    device=f"dev{i}",
                    rng=LightRandom(seed * 7919 + r * 101 + i + 1),
                )
        params = {
            k: np.sum([w * p[k] for w, p in zip(weights, new, strict=True)], axis=0).astype(
                np.float32
            )
            for k in params
        }
    acc: dict[str, list[float]] = {m: [] for m in METHODS}
    for i, (X, y, Xv, yv) in enumerate(devices):
        local, _ = train_local(
            spec,
            init_params(spec, np.random.default_rng(seed)),
            X,
            y,
            TrainConfig(epochs=args.rounds * args.epochs, lr=args.lr, batch_size=16),
            LightRandom(seed + i),
        )
        models: dict[str, Params] = {"global": params, "local only": local}
        for mode in ("finetune", "head"):
            pm = personal[mode][i]
            assert pm is not None
            models[mode] = pm.params
        for m in METHODS:
            acc[m].append(float(build_model(spec, models[m]).score(Xv, yv)))
    return acc


def stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values)
    return {
        "p10": float(np.percentile(a, 10)),
        "median": float(np.median(a)),
        "mean": float(a.mean()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--partition", default="dirichlet:0.1")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--model", default="softmax", choices=["softmax", "mlp"])
    ap.add_argument("--json", type=Path, default=None, help="write the raw results here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    per_seed = {seed: run_seed(seed, args) for seed in seeds}
    pooled = {m: [a for s in seeds for a in per_seed[s][m]] for m in METHODS}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        raw: dict[str, Any] = {
            "machine": machine(),
            "settings": vars(args) | {"json": str(args.json)},
            "per_device_accuracy": {str(s): per_seed[s] for s in seeds},
        }
        args.json.write_text(json.dumps(raw, indent=1))
    print(f"machine: {machine()}")
    print(
        f"setting: digits, {args.model}, {args.clients} devices, {args.partition}, "
        f"{args.rounds} FedAvg rounds of {args.epochs} local epoch(s), lr {args.lr}, head mode "
        f"{DEFAULT_HEAD_EPOCHS} head epochs per round; accuracy on each device's own "
        f"validation split (20 %), seeds {args.seeds}\n"
    )
    print("| model used by the device | p10 | median | mean | per seed (mean) |")
    print("|---|---:|---:|---:|---|")
    for m in METHODS:
        s = stats(pooled[m])
        seeds_text = ", ".join(f"{stats(per_seed[x][m])['mean']:.3f}" for x in seeds)
        print(f"| {m} | {s['p10']:.3f} | {s['median']:.3f} | {s['mean']:.3f} | {seeds_text} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
