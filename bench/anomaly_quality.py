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
model's own threshold. Data sets (simulator/anomaly.py): ``breast_cancer`` (benign normal,
malignant anomalous), ``digits`` (0-4 normal, 5-9 anomalous), split IID or Dirichlet(0.5) over
k-means clusters of the unlabeled training data (a label-free proxy: the training data have no
labels to skew by); ``sensors``: the drifting multi-sensor stream, each device training on a
sliding window of its own readings while they arrive, tested on the next readings of every
device with injected faults (spikes, stuck sensors, slow drift) at a rate of 10 %.

    .venv/bin/python -m bench.anomaly_quality [--seeds 0 1 2] [--datasets ...]
        [--json bench/results/anomaly_quality.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench._sim import machine
from fedmqtt.models.anomaly import Autoencoder, anomaly_scores, autoencoder_spec, score_quantile
from fedmqtt.models.spec import ModelSpec
from simulator.anomaly import Device, SensorStream, iter_shards, novelty, run_federation
from simulator.partition import partition

QUANTILE = 0.98
PLAN = {"epochs": 5, "lr": 0.03, "batch_size": 16, "momentum": 0.9}


@dataclass(frozen=True)
class Setup:
    devices: int
    hidden: int
    bottleneck: int
    versions: int

    @property
    def central_epochs(self) -> int:
        """Epochs over the pooled data with as many sequential SGD steps as the federation:
        a version's updates are trained in parallel, PLAN["epochs"] over a 1/devices shard."""
        return max(1, round(self.versions * int(PLAN["epochs"]) / self.devices))


SETUPS = {
    "breast_cancer": Setup(devices=5, hidden=16, bottleneck=4, versions=100),
    "digits": Setup(devices=10, hidden=32, bottleneck=8, versions=400),
    "sensors": Setup(devices=6, hidden=12, bottleneck=3, versions=120),
}
SENSOR_WINDOW = 200


def _metrics(
    scores: npt.NDArray[Any], threshold: float, y: npt.NDArray[np.int64]
) -> dict[str, float]:
    from sklearn.metrics import f1_score, roc_auc_score

    pred = (scores > threshold).astype(np.int64)
    return {
        "auroc": round(float(roc_auc_score(y, scores)), 4),
        "f1": round(float(f1_score(y, pred)), 4),
        "false_alarms": round(float(pred[y == 0].mean()), 4),
        "recall": round(float(pred[y == 1].mean()), 4),
    }


def _central(spec: ModelSpec, X: npt.NDArray[np.float32], epochs: int, seed: int) -> Autoencoder:
    # The same model and optimiser as the agents: the aggregator's initialisation (its
    # [model] seed), no gradient clipping, the plan's learning rate, momentum and batch size.
    model = Autoencoder(
        spec,
        lr=PLAN["lr"],
        epochs=epochs,
        batch_size=int(PLAN["batch_size"]),
        momentum=PLAN["momentum"],
        max_grad_norm=None,
        seed=seed,
    )
    return model.fit(X)


def _iforest(
    spec: ModelSpec, X: npt.NDArray[np.float32], Xt: npt.NDArray[np.float32], seed: int
) -> tuple[npt.NDArray[Any], float]:
    from sklearn.ensemble import IsolationForest

    off = np.asarray(spec.feature_offset, np.float32)
    sc = np.asarray(spec.feature_scale, np.float32)
    forest = IsolationForest(n_estimators=200, random_state=seed).fit((X - off) * sc)
    train = -forest.score_samples((X - off) * sc)  # higher = more anomalous
    return -forest.score_samples((Xt - off) * sc), score_quantile(train, QUANTILE)


def run_novelty(name: str, split: str, seed: int, workdir: Path) -> dict[str, Any]:
    s = SETUPS[name]
    d = novelty(name, seed=seed)
    spec = autoencoder_spec(
        d.X_train.shape[1],
        bottleneck=s.bottleneck,
        hidden=s.hidden,
        quantile=QUANTILE,
        feature_offset=d.feature_offset,
        feature_scale=d.feature_scale,
    )
    parts = partition(d.proxy, s.devices, split, seed=seed)
    fed = run_federation(
        spec,
        list(iter_shards(d.X_train, parts)),
        workdir,
        versions=s.versions,
        seed=seed,
        plan=PLAN,
    )
    assert fed.threshold is not None
    central = _central(spec, d.X_train, s.central_epochs, seed)
    long = _central(spec, d.X_train, 10 * s.central_epochs, seed)
    forest_scores, forest_t = _iforest(spec, d.X_train, d.X_test, seed)
    return {
        "dataset": name,
        "split": split if split == "iid" else f"{split} over k-means clusters",
        "seed": seed,
        "devices": s.devices,
        "shard_sizes": [len(p) for p in parts],
        "versions": fed.version,
        "federated_wall_s": round(fed.wall_s, 1),
        "federated": _metrics(anomaly_scores(spec, fed.params, d.X_test), fed.threshold, d.y_test),
        "central_ae": _metrics(central.score_samples(d.X_test), central.threshold_, d.y_test),
        "central_ae_10x": _metrics(long.score_samples(d.X_test), long.threshold_, d.y_test),
        "isolation_forest": _metrics(forest_scores, forest_t, d.y_test),
        "thresholds": {"federated": fed.threshold, "central_ae": central.threshold_},
    }


def run_sensors(seed: int, workdir: Path) -> dict[str, Any]:
    s = SETUPS["sensors"]
    streams = [SensorStream(seed=seed, device=i) for i in range(s.devices)]
    first = np.concatenate([st.readings(0, SENSOR_WINDOW) for st in streams])
    sd = first.std(axis=0)
    spec = autoencoder_spec(
        streams[0].n_sensors,
        bottleneck=s.bottleneck,
        hidden=s.hidden,
        quantile=QUANTILE,
        feature_offset=tuple(float(v) for v in first.mean(axis=0)),
        feature_scale=tuple(float(1 / v) for v in sd),
    )
    fed = run_federation(
        spec,
        [Device(stream=st, window=SENSOR_WINDOW) for st in streams],
        workdir,
        versions=s.versions,
        seed=seed,
        plan=PLAN,
        feed_period_s=0.2,
        feed_batch=10,
    )
    assert fed.threshold is not None
    # The central reference trains on the pooled windows the devices held at the end.
    pooled = np.concatenate(
        [st.readings(n - SENSOR_WINDOW, n) for st, n in zip(streams, fed.readings, strict=True)]
    )
    tests = [
        st.with_faults(n, n + 300, 0.1, seed + 1)
        for st, n in zip(streams, fed.readings, strict=True)
    ]
    Xt = np.concatenate([t[0] for t in tests])
    yt = np.concatenate([t[1] for t in tests])
    central = _central(spec, pooled, s.central_epochs, seed)
    long = _central(spec, pooled, 10 * s.central_epochs, seed)
    forest_scores, forest_t = _iforest(spec, pooled, Xt, seed)
    return {
        "dataset": "sensors",
        "split": "per-device machines, drift and sliding windows",
        "seed": seed,
        "devices": s.devices,
        "readings_per_device": fed.readings,
        "versions": fed.version,
        "federated_wall_s": round(fed.wall_s, 1),
        "federated": _metrics(anomaly_scores(spec, fed.params, Xt), fed.threshold, yt),
        "central_ae": _metrics(central.score_samples(Xt), central.threshold_, yt),
        "central_ae_10x": _metrics(long.score_samples(Xt), long.threshold_, yt),
        "isolation_forest": _metrics(forest_scores, forest_t, yt),
        "thresholds": {"federated": fed.threshold, "central_ae": central.threshold_},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--datasets", nargs="+", default=["breast_cancer", "digits", "sensors"])
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for name in args.datasets:
        for split in ("iid", "dirichlet:0.5") if name != "sensors" else ("stream",):
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as tmp:
                    if name == "sensors":
                        row = run_sensors(seed, Path(tmp))
                    else:
                        row = run_novelty(name, split, seed, Path(tmp))
                rows.append(row)
                gap = row["central_ae"]["auroc"] - row["federated"]["auroc"]
                print(
                    f"{name:13s} {row['split'][:14]:14s} seed {seed}: AUROC fed "
                    f"{row['federated']['auroc']:.3f} central {row['central_ae']['auroc']:.3f} "
                    f"(gap {gap:+.3f}) 10x {row['central_ae_10x']['auroc']:.3f} "
                    f"iforest {row['isolation_forest']['auroc']:.3f} | F1 fed "
                    f"{row['federated']['f1']:.3f} central {row['central_ae']['f1']:.3f} "
                    f"iforest {row['isolation_forest']['f1']:.3f} | {row['federated_wall_s']} s",
                    flush=True,
                )
    out = {
        "machine": machine(),
        "quantile": QUANTILE,
        "plan": PLAN,
        "setups": {
            k: {**v.__dict__, "central_epochs": v.central_epochs} for k, v in SETUPS.items()
        },
        "wall_s": round(time.monotonic() - t0, 1),
        "runs": rows,
    }
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
