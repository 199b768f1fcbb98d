"""Anomaly detection with a dense autoencoder (``kind="autoencoder"``), trained without labels.

The network reconstructs its preprocessed input ``x' = (x - offset) * scale`` through a narrow
hidden layer (the bottleneck); what it has learned to reconstruct is what *normal* looks like.
The anomaly **score** of a sample is its mean squared reconstruction error over the features,
in preprocessed units::

    score(x) = mean_j (x'_j - reconstruction(x')_j)^2

and the **decision** is ``score > threshold`` (1 = anomaly). The threshold is the level-``q``
quantile of the scores of normal data (``q`` is ``spec.extra["quantile"]``, default
:data:`DEFAULT_QUANTILE`), so about ``1 - q`` of normal samples are flagged. No device sends
its scores: each reports a few numbers, empirical quantiles of the scores of its own data
under the model version it started training from, at levels up to and beyond ``q``
(:func:`report_levels`, :func:`score_quantiles`), and the aggregator combines the reports into
the quantile of the pooled scores (:mod:`fedmqtt.aggregation.threshold`).

Only numpy is imported here, so a device can score without scikit-learn or onnxruntime.
"""

from __future__ import annotations

import math
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt

from fedmqtt.models.dense import check_params, forward_preprocessed, init_params, preprocess
from fedmqtt.models.spec import QUANTILE_KEY, ModelSpec
from fedmqtt.models.train import TrainConfig, TrainStats, train_local
from fedmqtt.params import Params, copy_params

__all__ = [
    "DEFAULT_QUANTILE",
    "Autoencoder",
    "anomaly_scores",
    "auroc",
    "autoencoder_spec",
    "quantile_level",
    "report_levels",
    "score_quantile",
    "score_quantiles",
]

DEFAULT_QUANTILE: Final = 0.99
F64 = npt.NDArray[np.float64]


def quantile_level(spec: ModelSpec) -> float:
    """The quantile of normal scores that the decision threshold estimates."""
    return float(spec.extra.get(QUANTILE_KEY, DEFAULT_QUANTILE))


def autoencoder_spec(
    n_features: int,
    *,
    bottleneck: int,
    hidden: int | None = None,
    quantile: float = DEFAULT_QUANTILE,
    feature_offset: tuple[float, ...] = (),
    feature_scale: tuple[float, ...] = (),
    feature_names: tuple[str, ...] = (),
) -> ModelSpec:
    """The spec of an autoencoder ``n_features -> [hidden ->] bottleneck [-> hidden] ->
    n_features``; ``hidden=None`` gives the single-hidden-layer network."""
    layers = (bottleneck,) if hidden is None else (hidden, bottleneck, hidden)
    extra = {} if quantile == DEFAULT_QUANTILE else {QUANTILE_KEY: float(quantile)}
    return ModelSpec(
        "autoencoder",
        n_features,
        n_features,
        hidden=layers,
        feature_offset=feature_offset,
        feature_scale=feature_scale,
        feature_names=feature_names,
        extra=extra,
    )


def _require_autoencoder(spec: ModelSpec) -> None:
    if not spec.is_autoencoder:
        raise ValueError(f"anomaly scores need an autoencoder spec, not {spec.kind!r}")


def anomaly_scores(spec: ModelSpec, params: Params, X: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Score of every row of raw ``X`` (float32, shape ``(n,)``); the ONNX graph computes the
    same (Sub, Mul, the layers, Sub, Mul, ReduceMean)."""
    _require_autoencoder(spec)
    check_params(spec, params)
    Xp = preprocess(spec, X, np.float32)
    recon = forward_preprocessed(spec, params, Xp)
    diff = Xp - recon
    out: npt.NDArray[np.float32] = np.mean(diff * diff, axis=1, dtype=np.float32)
    return out


def score_quantile(scores: npt.ArrayLike, q: float) -> float:
    """The empirical ``q``-quantile of ``scores`` (linear interpolation, numpy's default).

    Raises ``ValueError`` on an
    empty or non-finite input, so a broken score never becomes a threshold.
    """
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("need a non-empty 1-D array of scores")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or Inf")
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile level must be in (0, 1), not {q!r}")
    return _quantiles(np.sort(s), (q,))[0]


def _quantiles(ordered: F64, levels: tuple[float, ...]) -> tuple[float, ...]:
    """numpy's default (linear) quantiles of sorted data, without ``np.quantile``, which
    imports ``numpy.ma`` and would grow the agent's footprint for one interpolation."""
    last = ordered.shape[0] - 1
    out = []
    for lv in levels:
        h = last * lv
        lo = math.floor(h)
        hi = min(lo + 1, last)
        out.append(float(ordered[lo] + (h - lo) * (ordered[hi] - ordered[lo])))
    return tuple(out)


def report_levels(q: float) -> tuple[float, ...]:
    """The levels at which a device reports the quantiles of its scores: a ladder from the
    median to ``q`` and two levels beyond it, so that the aggregator can locate the pooled
    ``q``-quantile of devices whose scores differ (fedmqtt.aggregation.threshold)."""
    tail = 1.0 - q
    levels = {0.5, 0.75, 0.9, 0.95, q, 1.0 - tail / 2, 1.0 - tail / 4}
    return tuple(sorted(levels))


def score_quantiles(scores: npt.ArrayLike, levels: tuple[float, ...]) -> tuple[float, ...]:
    """:func:`score_quantile` at each of ``levels``, from one sort of the scores."""
    for lv in levels:
        score_quantile([0.0], lv)  # checks the level
    score_quantile(scores, 0.5)  # checks the scores
    return _quantiles(np.sort(np.asarray(scores, np.float64)), levels)


def auroc(anomalous: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve of ``scores`` for the 0/1 (or bool) labels ``anomalous``:
    the probability that an anomaly scores higher than a normal sample, ties counting half
    (the Mann-Whitney statistic; scikit-learn's ``roc_auc_score`` without scikit-learn)."""
    y = np.asarray(anomalous).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if y.shape != s.shape or n_pos == 0 or n_neg == 0:
        raise ValueError("need matching labels and scores, with both classes present")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.shape[0], dtype=np.float64)
    ranks[order] = np.arange(1, s.shape[0] + 1)
    # Tied scores share their mean rank.
    uniq, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    if uniq.shape[0] < s.shape[0]:
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


class Autoencoder:
    """Estimator with the scikit-learn outlier-detector conventions, for simulations and
    references: ``fit(X)`` trains on (normal) data and sets ``threshold_`` to the
    ``quantile``-quantile of the training scores; ``score_samples`` returns the anomaly
    scores (higher = more anomalous, unlike scikit-learn's sign convention, which this
    project's ONNX graph and CLI do not follow); ``predict`` returns 0/1 (1 = anomaly).
    """

    def __init__(
        self,
        spec: ModelSpec,
        *,
        lr: float = 0.05,
        epochs: int = 30,
        batch_size: int = 32,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = 5.0,
        seed: int = 0,
    ) -> None:
        _require_autoencoder(spec)
        self.spec = spec
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        self.params: Params = init_params(spec, self._rng)
        self.threshold_: float = math.inf
        self.train_stats_: TrainStats | None = None

    def set_weights(self, params: Params, threshold: float | None = None) -> None:
        check_params(self.spec, params)
        self.params = copy_params(params)
        if threshold is not None:
            self.threshold_ = float(threshold)

    def partial_fit(self, X: npt.ArrayLike, epochs: int = 1) -> Self:
        """Train ``epochs`` epochs from the current weights (no threshold update)."""
        Xa = np.asarray(X)
        cfg = TrainConfig(
            epochs=epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )
        self.params, self.train_stats_ = train_local(
            self.spec, self.params, Xa, np.zeros(Xa.shape[0]), cfg, self._rng
        )
        return self

    def fit(self, X: npt.ArrayLike, y: Any = None) -> Self:
        """Train from the current weights for ``epochs`` epochs, then set ``threshold_``."""
        self.partial_fit(X, self.epochs)
        self.threshold_ = score_quantile(self.score_samples(X), quantile_level(self.spec))
        return self

    def score_samples(self, X: npt.ArrayLike) -> npt.NDArray[np.float32]:
        return anomaly_scores(self.spec, self.params, X)

    def predict(self, X: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """1 where the score exceeds ``threshold_`` (an anomaly), else 0."""
        return (self.score_samples(X) > np.float32(self.threshold_)).astype(np.int64)
