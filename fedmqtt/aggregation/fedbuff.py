"""FedBuff: buffer K asynchronous updates, discount each by staleness, take one server step.

    John Nguyen, Kshitiz Malik, Hongyuan Zhan, Ashkan Yousefpour, Michael Rabbat, Mani Malek,
    Dzmitry Huba. "Federated Learning with Buffered Asynchronous Aggregation." AISTATS 2022,
    arXiv:2106.06639.

The server keeps accepting deltas while devices train; once the buffer holds K of them it
applies ``w <- w + lr * aggregate`` through a server optimizer. Optional server momentum is the
heavy-ball update of FedAvgM:

    Tzu-Ming Harry Hsu, Hang Qi, Matthew Brown. "Measuring the Effects of Non-Identical Data
    Distribution for Federated Visual Classification." arXiv:1909.06335 (2019).

The staleness weight ``s_i = s(tau_i)`` multiplies each delta *absolutely*: the "mean" aggregate
is ``sum_i (n_i / sum_j n_j) * s_i * delta_i``, not normalised by ``sum_i s_i``, so a buffer of
only stale updates moves the model less (normalising would cancel the discount whenever all
updates are equally stale). With every ``s_i = 1``, server lr 1 and no momentum this is exactly
sample-weighted FedAvg.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np

from fedmqtt.aggregation._common import (
    all_finite,
    batch,
    positive_total,
    row_weights,
    to_f32,
    vector,
)
from fedmqtt.aggregation.fedavg import _weighted_sum64
from fedmqtt.aggregation.robust import _coordinate_median, _trimmed_mean
from fedmqtt.params import F32

Reducer = Literal["mean", "trimmed-mean", "median"]
REDUCERS: tuple[Reducer, ...] = get_args(Reducer)


def fedbuff_aggregate(
    deltas: F32,
    staleness_weights: F32,
    num_samples: F32,
    *,
    reducer: Reducer = "mean",
    trim_fraction: float = 0.1,
) -> F32:
    """Combine a buffer of K deltas (a (K, d) batch) into one aggregate delta.

    ``staleness_weights``: (K,) values ``s(tau_i)`` in [0, 1] (a value above 1 is refused:
    it usually means staleness ``tau`` was passed instead of ``s(tau)``). ``num_samples``: (K,)
    local sample counts, finite, >= 0, with a positive sum (validated for every reducer, so the
    choice of reducer never changes which inputs are accepted).

    * ``"mean"``: ``sum_i (n_i / sum n) * s_i * delta_i``.
    * ``"trimmed-mean"`` / ``"median"``: :func:`~fedmqtt.aggregation.robust.trimmed_mean`
      (with ``trim_fraction``) or :func:`~fedmqtt.aggregation.robust.coordinate_median` of the
      rows ``s_i * delta_i``, **not** weighted by ``n_i``: ``num_samples`` is self-reported, and
      weighting by it would let one attacker claiming a huge count outweigh every honest row,
      which is exactly what these reducers are meant to resist. Each row counts once.
      Discounting before reducing shrinks stale rows towards 0, so they pull a coordinate's
      median or trimmed mean slightly towards 0; that is the intended effect of staleness.
    """
    x = batch(deltas)
    k = x.shape[0]
    s = row_weights(staleness_weights, k, "staleness_weights")
    if (s > 1).any():
        raise ValueError(
            f"staleness_weights must be in [0, 1], got maximum {s.max()} (pass s(tau), not tau)"
        )
    n = row_weights(num_samples, k, "num_samples")
    total = positive_total(n, "num_samples")
    if reducer == "mean":
        return to_f32(_weighted_sum64(x, n / total * s), "fedbuff aggregate")
    if reducer == "trimmed-mean":
        return _trimmed_mean(x, trim_fraction, s)
    if reducer == "median":
        return _coordinate_median(x, s)
    raise ValueError(f"unknown reducer {reducer!r}, expected one of {REDUCERS}")


@dataclass(eq=False)
class ServerOptimizer:
    """Server step with learning rate ``lr`` and optional heavy-ball ``momentum``.

    ``step`` sets ``v = momentum * v + delta`` (``v`` starts at 0) and returns ``w + lr * v``;
    with momentum 0 that is ``w + lr * delta`` and no velocity is kept (``velocity`` is None,
    also when one is passed in, so there is nothing to checkpoint). The velocity is stored in
    float32 and the step uses the stored value, so an optimizer restored with
    :meth:`from_state` continues bit for bit.
    """

    lr: float = 1.0
    momentum: float = 0.0
    velocity: F32 | None = None

    def __post_init__(self) -> None:
        self.lr = float(self.lr)
        self.momentum = float(self.momentum)
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"server lr must be finite and > 0, got {self.lr!r}")
        if not 0.0 <= self.momentum < 1.0:  # also refuses NaN
            raise ValueError(f"server momentum must be in [0, 1), got {self.momentum!r}")
        if self.momentum == 0.0:
            self.velocity = None  # unused without momentum; do not carry it into checkpoints
        elif self.velocity is not None:
            # Own a private copy: the caller's array must not change under us, nor we under it.
            self.velocity = vector(self.velocity, "velocity").copy()

    def step(self, w: F32, aggregate_delta: F32) -> F32:
        """Return the new global model (a new vector); updates ``velocity`` if momentum > 0.

        Raises ValueError on non-finite or mismatched input, or if the new model would
        overflow float32; the optimizer state is left unchanged in that case.
        """
        if self.momentum == 0.0 and self.lr == 1.0:
            return _plain_step(w, aggregate_delta)
        w32 = vector(w, "w")
        delta = vector(aggregate_delta, "aggregate_delta", w32.shape[0])
        if self.momentum == 0.0:
            out = np.multiply(delta, self.lr, dtype=np.float64)
            out += w32
            return to_f32(out, "server step result")
        v64 = delta.astype(np.float64)
        if self.velocity is not None:
            if self.velocity.shape != delta.shape:
                raise ValueError(
                    f"velocity has shape {self.velocity.shape} but the delta {delta.shape}"
                )
            v64 += self.momentum * self.velocity.astype(np.float64)
        v32 = to_f32(v64, "server velocity")
        out = np.multiply(v32, self.lr, dtype=np.float64)
        out += w32
        new_w = to_f32(out, "server step result")
        self.velocity = v32
        return new_w

    def to_state(self) -> dict[str, Any]:
        """``{"lr", "momentum", "velocity"}``; velocity is a float32 copy or None."""
        v = None if self.velocity is None else self.velocity.copy()
        return {"lr": self.lr, "momentum": self.momentum, "velocity": v}

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ServerOptimizer:
        """A new optimizer equal to the one that produced ``state`` (ValueError if invalid)."""
        try:
            return cls(state["lr"], state["momentum"], state["velocity"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid ServerOptimizer state: {exc!r}") from None


def _plain_step(w: F32, aggregate_delta: F32) -> F32:
    """``w + delta``: the server step with lr 1 and no momentum (FedBuff's default, FedAvg).

    Same result, bit for bit, as the general path (``w + lr * delta`` in float64, rounded once
    to float32): float32 addition is correctly rounded, and rounding the float64 sum of two
    float32 values to float32 gives that same correctly rounded sum (53 >= 2 * 24 + 2, so the
    double rounding is innocuous). It skips the float64 detour, which at d = 1e6 allocates,
    writes and reads 8 MB twice and costs several times the addition itself. The inputs are
    checked for NaN/Inf only through the result (NaN and Inf propagate through a sum, so a
    finite sum has finite operands); when the sum is not finite the full checks run and raise
    the same error, in the same order, as the general path.
    """
    w32 = vector(w, "w", finite=False)
    try:
        delta = vector(aggregate_delta, "aggregate_delta", w32.shape[0], finite=False)
    except ValueError:
        vector(w32, "w")  # a non-finite w is reported first, as on the general path
        raise
    with np.errstate(over="ignore", invalid="ignore"):
        out: F32 = np.add(w32, delta)
    if not all_finite(out):
        vector(w32, "w")
        vector(delta, "aggregate_delta")
        raise ValueError("server step result is not finite in float32 (overflow)")
    return out
