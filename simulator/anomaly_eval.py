"""One evaluated federation of autoencoders: the federated model and its federated threshold
against central references, on held-out data with labelled anomalies.

Used by ``fedmqtt simulate --model autoencoder`` and bench/anomaly_quality.py. For a data set
(``breast_cancer`` and ``digits`` novelty variants, or the ``sensors`` stream; see
:mod:`simulator.anomaly`) it runs :func:`simulator.anomaly.run_federation` and reports, for

* **federated**: the final global model with the aggregator's threshold;
* **central_ae**: the same autoencoder (spec, initialisation, optimiser, batch size) trained on
  the pooled training data for as many sequential SGD steps as the federation took
  (versions x local epochs / devices epochs), its threshold the same quantile of its pooled
  training scores; **central_ae_10x** (optional) ten times as long;
* **isolation_forest**: scikit-learn's IsolationForest (200 trees) on the pooled preprocessed
  training data, its threshold the same quantile of its training scores;

the AUROC of the scores and, at each model's own threshold, F1 (anomaly = positive class),
the false-alarm rate and the recall.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import ConfigError
from fedmqtt.models.anomaly import Autoencoder, anomaly_scores, autoencoder_spec, score_quantile
from fedmqtt.models.spec import ModelSpec
from simulator.anomaly import (
    NOVELTY,
    Device,
    NoveltyData,
    SensorStream,
    iter_shards,
    novelty,
    run_federation,
)

DATASETS: Final = (*NOVELTY, "sensors")
SENSOR_WINDOW: Final = 200  # readings each sensor device trains on (its sliding window)
SENSOR_TEST: Final = 300  # held-out readings per sensor device, after the run
SENSOR_FAULT_RATE: Final = 0.1


@dataclass(frozen=True)
class Setup:
    """A federation to evaluate: the fleet, the autoencoder's widths, the local plan."""

    devices: int
    hidden: int | None
    bottleneck: int
    versions: int | None  # None: run until timeout_s
    quantile: float = 0.98
    plan: tuple[tuple[str, Any], ...] = (
        ("epochs", 5),
        ("lr", 0.03),
        ("batch_size", 16),
        ("momentum", 0.9),
    )
    buffer_size: int | None = None
    downlink: str = "int8"  # codec of the published model
    strategy: tuple[tuple[str, Any], ...] = ()
    timeout_s: float = 600.0
    require_versions: bool = True  # False: a run that reaches timeout_s first just ends there
    central_10x: bool = True

    @property
    def plan_dict(self) -> dict[str, Any]:
        return dict(self.plan)

    def central_epochs(self, versions: int) -> int:
        """Epochs over the pooled data with as many sequential SGD steps as ``versions`` of
        the federation: a version's updates are trained in parallel, each of the plan's
        epochs over a 1/devices shard."""
        return max(1, round(versions * int(self.plan_dict["epochs"]) / self.devices))

    def spec_for(
        self, n_features: int, offset: tuple[float, ...], scale: tuple[float, ...]
    ) -> ModelSpec:
        """The autoencoder of this setup for data preprocessed by ``offset`` and ``scale``."""
        return autoencoder_spec(
            n_features,
            bottleneck=self.bottleneck,
            hidden=self.hidden,
            quantile=self.quantile,
            feature_offset=offset,
            feature_scale=scale,
        )

    def novelty_spec(self, d: NoveltyData) -> ModelSpec:
        return self.spec_for(d.X_train.shape[1], d.feature_offset, d.feature_scale)


def metrics(
    scores: npt.NDArray[Any], threshold: float, y: npt.NDArray[np.int64]
) -> dict[str, float]:
    """AUROC of ``scores``; F1, false-alarm rate and recall of ``scores > threshold``."""
    from sklearn.metrics import f1_score, roc_auc_score

    pred = (scores > threshold).astype(np.int64)
    return {
        "auroc": round(float(roc_auc_score(y, scores)), 4),
        "f1": round(float(f1_score(y, pred, zero_division=0.0)), 4),
        "false_alarms": round(float(pred[y == 0].mean()), 4),
        "recall": round(float(pred[y == 1].mean()), 4),
    }


def central(
    spec: ModelSpec, X: npt.NDArray[np.float32], epochs: int, seed: int, plan: dict[str, Any]
) -> Autoencoder:
    """The central reference: the aggregator's initialisation (its [model] seed), no gradient
    clipping, the plan's learning rate, momentum and batch size, on the pooled data."""
    model = Autoencoder(
        spec,
        lr=float(plan["lr"]),
        epochs=epochs,
        batch_size=int(plan["batch_size"]),
        momentum=float(plan.get("momentum", 0.0)),
        max_grad_norm=None,
        seed=seed,
    )
    return model.fit(X)


def iforest(
    spec: ModelSpec, X: npt.NDArray[np.float32], Xt: npt.NDArray[np.float32], seed: int
) -> tuple[npt.NDArray[Any], float]:
    from sklearn.ensemble import IsolationForest

    off = np.asarray(spec.feature_offset, np.float32)
    sc = np.asarray(spec.feature_scale, np.float32)
    forest = IsolationForest(n_estimators=200, random_state=seed).fit((X - off) * sc)
    train = -forest.score_samples((X - off) * sc)  # higher = more anomalous
    q = float(spec.extra.get("quantile", 0.98)) if spec.extra else 0.98
    return -forest.score_samples((Xt - off) * sc), score_quantile(train, q)


def evaluate(dataset: str, split: str, seed: int, workdir: Path, setup: Setup) -> dict[str, Any]:
    """Run and evaluate one federation (see the module docstring); a JSON-ready dict."""
    from simulator.partition import partition

    if dataset not in DATASETS:
        raise ConfigError(f"unknown anomaly data set {dataset!r}; choose one of {DATASETS}")
    plan = setup.plan_dict
    row: dict[str, Any] = {"dataset": dataset, "seed": seed, "devices": setup.devices}
    if dataset == "sensors":
        streams = [SensorStream(seed=seed, device=i) for i in range(setup.devices)]
        first = np.concatenate([st.readings(0, SENSOR_WINDOW) for st in streams])
        sd = first.std(axis=0)
        spec = setup.spec_for(
            streams[0].n_sensors,
            tuple(float(v) for v in first.mean(axis=0)),
            tuple(float(1 / v) for v in sd),
        )
        devices = [Device(stream=st, window=SENSOR_WINDOW) for st in streams]
        row["split"] = "per-device machines, drift and sliding windows"
    else:
        d = novelty(dataset, seed=seed)
        spec = setup.novelty_spec(d)
        parts = partition(d.proxy, setup.devices, split, seed=seed)
        devices = list(iter_shards(d.X_train, parts))
        row["split"] = split if split == "iid" else f"{split} over k-means clusters"
        row["shard_sizes"] = [len(p) for p in parts]
    fed = run_federation(
        spec,
        devices,
        workdir,
        versions=setup.versions,
        seed=seed,
        plan=plan,
        buffer_size=setup.buffer_size,
        downlink=setup.downlink,
        strategy=dict(setup.strategy),
        timeout_s=setup.timeout_s,
        require_versions=setup.require_versions,
        feed_period_s=0.2,
        feed_batch=10,
    )
    if fed.threshold is None:
        raise ConfigError(f"no threshold after {fed.version} versions: no device reported")
    if dataset == "sensors":
        # The references train on the pooled windows the devices held at the end; the test
        # data are every device's next readings, with injected faults.
        X = np.concatenate(
            [st.readings(n - SENSOR_WINDOW, n) for st, n in zip(streams, fed.readings, strict=True)]
        )
        tests = [
            st.with_faults(n, n + SENSOR_TEST, SENSOR_FAULT_RATE, seed + 1)
            for st, n in zip(streams, fed.readings, strict=True)
        ]
        Xt = np.concatenate([t[0] for t in tests])
        yt = np.concatenate([t[1] for t in tests])
        row["readings_per_device"] = fed.readings
    else:
        X, Xt, yt = d.X_train, d.X_test, d.y_test
    epochs = setup.central_epochs(fed.version)
    ref = central(spec, X, epochs, seed, plan)
    forest_scores, forest_t = iforest(spec, X, Xt, seed)
    fed_scores = anomaly_scores(spec, fed.params, Xt)
    # What the threshold would be if every report had been measured on the final version:
    # the quantile of the final model's scores on the devices' (pooled) training data. The
    # federated threshold differs from it by the estimate's interpolation and by the model's
    # moves since the versions the reports were measured on.
    final_t = score_quantile(anomaly_scores(spec, fed.params, X), setup.quantile)
    row |= {
        "versions": fed.version,
        "federated_wall_s": round(fed.wall_s, 1),
        "central_epochs": epochs,
        "report_versions": sorted(b for _, _, b in fed.reports.values()),
        "federated": metrics(fed_scores, fed.threshold, yt),
        "federated_at_final_quantile": metrics(fed_scores, final_t, yt),
        "central_ae": metrics(ref.score_samples(Xt), ref.threshold_, yt),
    }
    if setup.central_10x:
        long = central(spec, X, 10 * epochs, seed, plan)
        row["central_ae_10x"] = metrics(long.score_samples(Xt), long.threshold_, yt)
    row["isolation_forest"] = metrics(forest_scores, forest_t, yt)
    row["auroc_gap"] = round(row["central_ae"]["auroc"] - row["federated"]["auroc"], 4)
    row["thresholds"] = {
        "federated": fed.threshold,
        "final_quantile": final_t,
        "central_ae": ref.threshold_,
    }
    return row
