"""Server-side evaluation of a global-model version on an optional holdout file.

The holdout is an ``.npz`` with ``X`` (n, n_features) and ``y``: class labels for a classifier
(scored by accuracy), targets (n,) or (n, n_outputs) for the linear model (scored by R^2), 0/1
for an autoencoder (1 = anomaly; scored by the AUROC of the anomaly scores). It is
loaded and checked once at start, so a wrong file is a configuration error, not a failure in the
middle of a run. Scoring goes through :func:`fedmqtt.models.build_model`, the same estimator a
user would build from a downloaded model.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import ConfigError
from fedmqtt.models import build_model
from fedmqtt.models.anomaly import anomaly_scores, auroc
from fedmqtt.models.spec import ModelSpec
from fedmqtt.npz import read_npz
from fedmqtt.params import F32, Layout


@dataclass(frozen=True)
class Holdout:
    X: npt.NDArray[np.float32]
    y: npt.NDArray[Any]

    @property
    def n(self) -> int:
        return int(self.X.shape[0])


def load_holdout(path: Path, spec: ModelSpec) -> Holdout:
    try:
        arrays, _ = read_npz(path, ("X", "y"))
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise ConfigError(f"[evaluation] holdout {path}: cannot read ({e})") from None
    if "X" not in arrays or "y" not in arrays:
        raise ConfigError(f"[evaluation] holdout {path}: needs arrays X and y")
    X, y = np.asarray(arrays["X"], dtype=np.float32), np.asarray(arrays["y"])
    if X.ndim != 2 or X.shape[1] != spec.n_features or X.shape[0] == 0:
        raise ConfigError(
            f"[evaluation] holdout {path}: X must be (n > 0, {spec.n_features}), got {X.shape}"
        )
    if y.shape[0] != X.shape[0]:
        raise ConfigError(f"[evaluation] holdout {path}: X and y have different lengths")
    if spec.is_autoencoder and (set(np.unique(y).tolist()) != {0, 1}):
        raise ConfigError(
            f"[evaluation] holdout {path}: an autoencoder's y must hold 0 (normal) and 1 "
            "(anomaly), both"
        )
    if not np.isfinite(X).all():
        raise ConfigError(f"[evaluation] holdout {path}: X has NaN or Inf")
    return Holdout(X, y)


def metric_name(spec: ModelSpec) -> str:
    if spec.is_autoencoder:
        return "auroc"
    return "accuracy" if spec.is_classifier else "r2"


def evaluate(spec: ModelSpec, layout: Layout, flat: F32, holdout: Holdout) -> float:
    """Accuracy (classifiers), R^2 (linear) or AUROC (autoencoders) of the flat parameters on
    the holdout."""
    if spec.is_autoencoder:
        scores = anomaly_scores(spec, layout.unflatten(flat, copy=False), holdout.X)
        return auroc(np.asarray(holdout.y) == 1, scores)
    model = build_model(spec, layout.unflatten(flat, copy=False))
    return float(model.score(holdout.X, holdout.y))
