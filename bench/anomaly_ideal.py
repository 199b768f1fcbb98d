"""The autoencoder's federated averaging without the system: is the quality gap the algorithm?

In one process, on the same novelty split, shards, initial weights and plan as
bench/anomaly_quality.py: **sync buffer**, every version averages the updates of K devices
(round robin), each trained for the plan's local epochs from the current model (no
staleness, no quantisation, fresh momentum per update: what FedBuff computes when every update
is fresh); **sequential**, one device at a time (K = 1); and the **central** reference at as many
sequential SGD steps. AUROC on the held-out test set.

    .venv/bin/python -m bench.anomaly_ideal [--dataset digits] [--seeds 0 1 2] [--versions N]
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.anomaly_quality import SETUPS
from fedmqtt.models.anomaly import Autoencoder, auroc
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params
from simulator.anomaly import novelty
from simulator.partition import partition


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="digits", choices=["digits", "breast_cancer"])
    ap.add_argument("--split", default="iid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--versions", type=int)
    args = ap.parse_args()
    s = SETUPS[args.dataset]
    plan = s.plan_dict
    epochs = int(plan["epochs"])
    versions = args.versions or s.versions or 100
    k = s.buffer_size or max(1, s.devices // 2)
    for seed in args.seeds:
        d = novelty(args.dataset, seed=seed)
        spec = s.novelty_spec(d)
        shards = [d.X_train[p] for p in partition(d.proxy, s.devices, args.split, seed=seed)]

        def model(n_epochs: int, spec: ModelSpec = spec, seed: int = seed) -> Autoencoder:
            return Autoencoder(
                spec,
                lr=float(plan["lr"]),
                epochs=n_epochs,
                batch_size=int(plan["batch_size"]),
                momentum=float(plan["momentum"]),
                max_grad_norm=None,
                seed=seed,
            )

        def score(m: Autoencoder, X: np.ndarray = d.X_test, y: np.ndarray = d.y_test) -> float:
            return round(auroc(y, m.score_samples(X)), 3)

        central = model(s.central_epochs(versions)).fit(d.X_train)
        sequential = model(epochs)
        for v in range(versions):
            sequential.partial_fit(shards[v % s.devices], epochs)
        buffered = model(epochs)
        w: Params = buffered.params
        for v in range(versions):
            deltas = []
            for j in range(k):
                m = model(epochs, seed=(seed * 1_000_003 + v) * 101 + j)
                m.set_weights(w)
                m.partial_fit(shards[(v * k + j) % s.devices], epochs)
                deltas.append({n: m.params[n] - w[n] for n in w})
            w = {
                n: (w[n] + np.mean([dl[n] for dl in deltas], axis=0)).astype(np.float32) for n in w
            }
        buffered.set_weights(w)
        print(
            f"{args.dataset} {args.split} seed {seed}, {versions} versions: AUROC central "
            f"{score(central)} sync buffer K={k} {score(buffered)} sequential {score(sequential)}",
            flush=True,
        )


if __name__ == "__main__":
    main()
