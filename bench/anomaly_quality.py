"""Anomaly-detection quality: the federated autoencoder against central references.

For each data set, split and seed, on held-out data with labelled anomalies:

* **federated**: the autoencoder trained by real agents through a real Mosquitto and the real
  aggregator (FedBuff), with the federated threshold (:mod:`fedmqtt.aggregation.threshold`),
  run until a fixed number of global versions (:func:`simulator.anomaly.run_federation`);
* **central AE**: the same autoencoder (spec, initialisation, optimiser, batch size) trained
  on the pooled training data, its threshold the same quantile of the pooled training scores,
  for as many SGD steps in sequence as the federation took (versions x local epochs / devices
  epochs: each version applies a buffer of updates trained in parallel, each of local epochs
  over a shard of 1/devices of the data); and **central AE (10x)**, ten times as long, to show
  where the model is still going;
* **IsolationForest** (scikit-learn, 200 trees) on the pooled preprocessed training data, its
  threshold the same quantile of its training scores.

Metrics: AUROC of the scores, and F1 (anomaly = positive class) and false-alarm rate at each
model's own threshold, and the federated model's at the quantile of its final version's own
training scores (what the threshold would be with every report measured on that version).
The evaluation is :func:`simulator.anomaly_eval.evaluate`, which ``fedmqtt simulate --model
autoencoder`` runs too. Data sets (simulator/anomaly.py): ``breast_cancer`` (benign normal,
malignant anomalous), ``digits`` (0-4 normal, 5-9 anomalous), split IID or Dirichlet(0.5) over
k-means clusters of the unlabeled training data (a label-free proxy: the training data have no
labels to skew by); ``sensors``: the drifting multi-sensor stream, each device training on a
sliding window of its own readings while they arrive, tested on the next readings of every
device with injected faults (spikes, stuck sensors, slow drift) at a rate of 10 %.

    .venv/bin/python -m bench.anomaly_quality [--seeds 0 1 2] [--datasets ...] [--splits ...]
        [--json bench/results/anomaly_quality.json]

One setting varied against the data sets' own (for the analysis in docs/benchmarks.md):
``--versions``, ``--epochs``, ``--lr``, ``--buffer-size``, ``--server-lr``, ``--staleness``,
``--downlink``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._sim import machine
from simulator.anomaly_eval import Setup, evaluate

SETUPS = {
    "breast_cancer": Setup(devices=5, hidden=16, bottleneck=4, versions=100),
    "digits": Setup(devices=10, hidden=32, bottleneck=8, versions=400),
    "sensors": Setup(devices=6, hidden=12, bottleneck=3, versions=120),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits", "sensors"])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--splits", nargs="+", default=["iid", "dirichlet:0.5"])
    ap.add_argument("--versions", type=int, help="instead of each data set's own")
    ap.add_argument("--epochs", type=int, help="local epochs (default 5)")
    ap.add_argument("--lr", type=float, help="local learning rate (default 0.03)")
    ap.add_argument("--buffer-size", type=int, help="FedBuff K (default devices / 2)")
    ap.add_argument("--server-lr", type=float, help="the server step (default 1)")
    ap.add_argument("--downlink", help="codec of the published model (default int8)")
    ap.add_argument("--staleness", help="FedBuff's staleness discount (default poly:0.5)")
    args = ap.parse_args()
    for name, s in list(SETUPS.items()):
        plan = s.plan_dict | {
            k: v for k, v in (("epochs", args.epochs), ("lr", args.lr)) if v is not None
        }
        strategy = dict(s.strategy)
        if args.server_lr is not None:
            strategy["server_lr"] = args.server_lr
        if args.staleness is not None:
            strategy["staleness"] = args.staleness
        SETUPS[name] = dataclasses.replace(
            s,
            versions=args.versions or s.versions,
            plan=tuple(plan.items()),
            buffer_size=args.buffer_size or s.buffer_size,
            downlink=args.downlink or s.downlink,
            strategy=tuple(strategy.items()),
        )
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for name in args.datasets:
        for split in args.splits if name != "sensors" else ("stream",):
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    row = evaluate(name, split, seed, Path(tmp), SETUPS[name])
                rows.append(row)
                gap = row["central_ae"]["auroc"] - row["federated"]["auroc"]
                print(
                    f"{name:13s} {row['split'][:14]:14s} seed {seed}: AUROC fed "
                    f"{row['federated']['auroc']:.3f} central {row['central_ae']['auroc']:.3f} "
                    f"(gap {gap:+.3f}) 10x {row['central_ae_10x']['auroc']:.3f} "
                    f"iforest {row['isolation_forest']['auroc']:.3f} | F1 fed "
                    f"{row['federated']['f1']:.3f} central {row['central_ae']['f1']:.3f} "
                    f"iforest {row['isolation_forest']['f1']:.3f} | false alarms fed "
                    f"{row['federated']['false_alarms']:.3f} at the final model's quantile "
                    f"{row['federated_at_final_quantile']['false_alarms']:.3f} | "
                    f"{row['federated_wall_s']} s",
                    flush=True,
                )
    out = {
        "machine": machine(),
        "setups": {
            k: {**v.__dict__, "plan": v.plan_dict, "strategy": dict(v.strategy)}
            for k, v in SETUPS.items()
        },
        "wall_s": round(time.monotonic() - t0, 1),
        "runs": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
