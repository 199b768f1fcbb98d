"""Local training on a device: mini-batch SGD with momentum, optionally FedProx.

This is what an edge agent runs between receiving a global model and sending its update, so
it is written for small CPUs: the shard is validated and preprocessed once, each epoch does a
single shuffled copy of the shard and then walks it in contiguous slices, and the optimizer
updates tensors in place.

FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) adds
``mu/2 * ||w - w_anchor||^2`` to the local objective, i.e. ``mu * (w - w_anchor)`` to the
gradient, which keeps a device with skewed data from drifting far from the global model it
started from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import FedMQTTError
from fedmqtt.models.dense import (
    FArray,
    check_params,
    encode_targets,
    loss_and_grad_preprocessed,
    preprocess,
)
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params, all_finite
from fedmqtt.rand import RandomSource

__all__ = ["TrainConfig", "TrainStats", "train_local"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one round of local training.

    ``weight_decay`` (L2, applied to weights and biases) and ``mu`` are added to the gradient
    after clipping: clipping bounds the data term, whose size is what varies between batches,
    while the two regularisers are deterministic pulls that should keep their full strength.
    """

    epochs: int = 1
    lr: float = 0.05
    batch_size: int = 32
    momentum: float = 0.9
    mu: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"epochs must be a positive integer, not {self.epochs!r}")
        if (
            isinstance(self.batch_size, bool)
            or not isinstance(self.batch_size, int)
            or self.batch_size < 1
        ):
            raise ValueError(f"batch_size must be a positive integer, not {self.batch_size!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, not {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), not {self.momentum!r}")
        if not (math.isfinite(self.mu) and self.mu >= 0):
            raise ValueError(f"mu must be finite and >= 0, not {self.mu!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, not {self.weight_decay!r}")
        if self.max_grad_norm is not None and not (
            math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0
        ):
            raise ValueError(f"max_grad_norm must be None or > 0, not {self.max_grad_norm!r}")


@dataclass(frozen=True)
class TrainStats:
    """Outcome of :func:`train_local`.

    ``loss`` is the sample-weighted mean data loss (no FedProx/L2 terms) over the mini-batches
    of the last epoch, each measured just before its update, as is usual for SGD. It costs
    nothing extra, at the price of lagging slightly behind the final parameters.
    ``num_samples`` is the shard size (the FedAvg weight), not samples times epochs.
    """

    loss: float
    num_samples: int
    steps: int


def _diverged(what: str, epoch: int, step: int) -> FedMQTTError:
    return FedMQTTError(
        f"training diverged: {what} at epoch {epoch + 1}, step {step}; "
        "lower lr, scale the features (spec feature_scale/offset) or set max_grad_norm"
    )


def train_local(  # noqa: PLR0917 - positional signature is the shared API contract
    spec: ModelSpec,
    params: Params,
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    config: TrainConfig,
    rng: RandomSource,
    anchor: Params | None = None,
) -> tuple[Params, TrainStats]:
    """Train a copy of ``params`` on ``(X, y)``; ``params`` itself is left untouched.

    ``anchor`` is the FedProx reference point and defaults to the starting parameters (the
    global model the device received). ``rng`` drives the per-epoch shuffling. Raises
    :class:`FedMQTTError` if the loss or the parameters stop being finite, so a diverged
    model is never sent to the aggregator.
    """
    check_params(spec, params)
    Xp = preprocess(spec, X, np.float32)
    # An autoencoder reconstructs its (preprocessed) input: labels, if any, are not used.
    targets = Xp if spec.is_autoencoder else encode_targets(spec, y, np.float32)
    n = Xp.shape[0]
    if targets.shape[0] != n:
        raise ValueError(f"X has {n} samples but y has {targets.shape[0]}")
    if n == 0:
        raise ValueError("cannot train on an empty shard")
    if not np.isfinite(Xp).all():
        # A broken sensor, not divergence: say so instead of failing later with a NaN loss.
        raise ValueError("X contains NaN or Inf (after preprocessing)")
    if not spec.is_classifier and not np.isfinite(targets).all():
        raise ValueError("y contains NaN or Inf")
    names = tuple(spec.param_shapes())
    w: dict[str, FArray] = {k: np.array(params[k], dtype=np.float32) for k in names}
    if not all_finite(w):
        raise ValueError("starting parameters contain NaN or Inf")
    ref: dict[str, FArray] | None = None
    if config.mu > 0:
        if anchor is None:
            ref = {k: v.copy() for k, v in w.items()}
        else:
            check_params(spec, anchor)
            ref = {k: np.asarray(anchor[k], dtype=np.float32) for k in names}
    velocity = {k: np.zeros_like(v) for k, v in w.items()}

    # Overflow on the way to divergence is reported by the FedMQTTError below, not by numpy
    # RuntimeWarnings.
    with np.errstate(over="ignore", invalid="ignore"):
        w, stats = _sgd(
            spec, w, ref=ref, velocity=velocity, Xp=Xp, targets=targets, config=config, rng=rng
        )
    return cast(Params, w), stats


def _sgd(
    spec: ModelSpec,
    w: dict[str, FArray],
    *,
    ref: dict[str, FArray] | None,
    velocity: dict[str, FArray],
    Xp: FArray,
    targets: npt.NDArray[Any],
    config: TrainConfig,
    rng: RandomSource,
) -> tuple[dict[str, FArray], TrainStats]:
    """The optimisation loop of :func:`train_local`, updating ``w`` and ``velocity`` in place."""
    names = tuple(w)
    n = Xp.shape[0]
    lr = np.float32(config.lr)
    momentum = np.float32(config.momentum)
    mu = np.float32(config.mu)
    wd = np.float32(config.weight_decay)
    bs = min(config.batch_size, n)
    steps = 0
    epoch_loss = math.nan
    for epoch in range(config.epochs):
        perm = rng.permutation(n)
        Xe = Xp[perm]
        Te: npt.NDArray[Any] = Xe if targets is Xp else targets[perm]
        total = 0.0
        for start in range(0, n, bs):
            xb = Xe[start : start + bs]
            loss, grads = loss_and_grad_preprocessed(spec, w, xb, Te[start : start + bs])
            steps += 1
            if not math.isfinite(loss):
                raise _diverged(f"loss is {loss}", epoch, steps)
            total += loss * xb.shape[0]
            if config.max_grad_norm is not None:
                norm = math.sqrt(sum(float(np.vdot(g, g)) for g in grads.values()))
                if not math.isfinite(norm):
                    raise _diverged("gradient is not finite", epoch, steps)
                if norm > config.max_grad_norm:
                    factor = np.float32(config.max_grad_norm / norm)
                    for grad in grads.values():
                        np.multiply(grad, factor, out=grad)
            for k in names:
                g = grads[k]
                if wd:
                    g += wd * w[k]
                if ref is not None:
                    g += mu * (w[k] - ref[k])
                v = velocity[k]
                v *= momentum
                v += g
                w[k] -= lr * v
        epoch_loss = total / n
    if not all_finite(w):
        raise _diverged("parameters are not finite", config.epochs - 1, steps)
    return w, TrainStats(loss=epoch_loss, num_samples=n, steps=steps)
