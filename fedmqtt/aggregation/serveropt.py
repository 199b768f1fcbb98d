"""Adaptive server optimizers: FedAdagrad, FedAdam and FedYogi.

    Sashank J. Reddi, Zachary Charles, Manzil Zaheer, Zachary Garrett, Keith Rush, Jakub
    Konecny, Sanjiv Kumar, H. Brendan McMahan. "Adaptive Federated Optimization." ICLR 2021,
    arXiv:2003.00295 (Algorithm 2).

The aggregated delta of a server step is the pseudo-gradient ``g`` (pointing *towards* the
improvement, so it is added). With first moment ``m`` and second moment ``v``::

    m <- beta1 * m + (1 - beta1) * g
    v <- v + g^2                                       (FedAdagrad)
    v <- beta2 * v + (1 - beta2) * g^2                 (FedAdam)
    v <- v - (1 - beta2) * g^2 * sign(v - g^2)         (FedYogi)
    w <- w + server_lr * m / (sqrt(v) + tau)

As in the paper, ``m`` starts at 0 and ``v`` at ``tau^2``, there is no bias correction, and
``tau`` bounds the adaptivity (a larger ``tau`` makes every step more like plain SGD with
learning rate ``server_lr / tau``). Each coordinate moves by at most about ``server_lr`` per
step, whatever the scale of the deltas, which is why these optimizers need a much smaller
``server_lr`` than the plain step (:data:`DEFAULT_SERVER_LR`).

The moments are kept in float32 and each step is computed in float64 from the stored values
and rounded once, so an optimizer restored from :meth:`AdaptiveOptimizer.to_state` continues bit
for bit. The names and defaults of the ``[strategy]`` options live here, once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, get_args

import numpy as np

from fedmqtt.aggregation._common import F64, to_f32, vector
from fedmqtt.params import F32

ServerOptimizerName = Literal["sgd", "adagrad", "adam", "yogi"]
SERVER_OPTIMIZERS: Final[tuple[ServerOptimizerName, ...]] = get_args(ServerOptimizerName)
ADAPTIVE: Final[tuple[ServerOptimizerName, ...]] = ("adagrad", "adam", "yogi")

# Defaults of [strategy] server_optimizer, server_lr (per optimizer), beta1, beta2, tau.
DEFAULT_SERVER_OPTIMIZER: Final[ServerOptimizerName] = "sgd"
DEFAULT_SERVER_LR: Final[Mapping[ServerOptimizerName, float]] = {
    "sgd": 1.0,
    "adagrad": 0.1,
    "adam": 0.01,
    "yogi": 0.01,
}
DEFAULT_BETA1: Final = 0.9
DEFAULT_BETA2: Final = 0.99
DEFAULT_TAU: Final = 1e-3


def check_hyperparameters(lr: float, beta1: float, beta2: float, tau: float) -> None:
    """ValueError naming the first of ``lr > 0``, ``0 <= beta1 < 1``, ``0 <= beta2 < 1``,
    ``tau > 0`` (all finite) that does not hold."""
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"server_lr must be finite and > 0, got {lr!r}")
    if not 0.0 <= beta1 < 1.0:  # also refuses NaN
        raise ValueError(f"beta1 must be in [0, 1), got {beta1!r}")
    if not 0.0 <= beta2 < 1.0:
        raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be finite and > 0, got {tau!r}")


@dataclass(eq=False)
class AdaptiveOptimizer:
    """The common step of the three; subclasses differ only in :meth:`second_moment`.

    ``m``/``v`` are None until the first step (then ``(d,)`` float32 vectors); ``steps``
    counts the steps taken. :meth:`step` leaves the state unchanged when it raises.
    """

    name: ClassVar[ServerOptimizerName]

    lr: float
    beta1: float = DEFAULT_BETA1
    beta2: float = DEFAULT_BETA2
    tau: float = DEFAULT_TAU
    m: F32 | None = field(default=None, repr=False)
    v: F32 | None = field(default=None, repr=False)
    steps: int = 0

    def __post_init__(self) -> None:
        self.lr, self.beta1 = float(self.lr), float(self.beta1)
        self.beta2, self.tau = float(self.beta2), float(self.tau)
        check_hyperparameters(self.lr, self.beta1, self.beta2, self.tau)
        if (self.m is None) != (self.v is None):
            raise ValueError("m and v must be given together")
        if self.m is not None and self.v is not None:
            m = vector(self.m, "m").copy()
            v = vector(self.v, "v", m.shape[0]).copy()
            if (v < 0).any():
                raise ValueError("v must be >= 0")
            self.m, self.v = m, v
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ValueError(f"steps must be an integer >= 0, got {self.steps!r}")

    def second_moment(self, v: F64, g2: F64) -> F64:
        """The new second moment from the previous ``v`` and the squared pseudo-gradient."""
        raise NotImplementedError

    def step(self, w: F32, aggregate_delta: F32) -> F32:
        """Return the new global model (a new vector) and update ``m``, ``v`` and ``steps``.

        Raises ValueError on non-finite or mismatched input, or if the result would overflow
        float32; the state is left unchanged in that case.
        """
        w32 = vector(w, "w")
        g = vector(aggregate_delta, "aggregate_delta", w32.shape[0]).astype(np.float64)
        if self.m is None or self.v is None:
            m0: F64 = np.zeros_like(g)
            v0: F64 = np.full_like(g, self.tau * self.tau)
        else:
            if self.m.shape != g.shape:
                raise ValueError(
                    f"optimizer state has {self.m.shape[0]} values but the delta {g.shape[0]}"
                )
            m0, v0 = self.m.astype(np.float64), self.v.astype(np.float64)
        m64 = self.beta1 * m0 + (1.0 - self.beta1) * g
        v64 = self.second_moment(v0, g * g)
        m32 = to_f32(m64, f"{self.name} first moment")
        v32 = to_f32(np.maximum(v64, 0.0), f"{self.name} second moment")
        out = self.lr * m32.astype(np.float64) / (np.sqrt(v32.astype(np.float64)) + self.tau)
        out += w32
        new_w = to_f32(out, "server step result")
        self.m, self.v, self.steps = m32, v32, self.steps + 1
        return new_w

    def to_state(self) -> dict[str, Any]:
        """``{"optimizer", "lr", "beta1", "beta2", "tau", "steps", "m", "v"}`` (copies)."""
        return {
            "optimizer": self.name,
            "lr": self.lr,
            "beta1": self.beta1,
            "beta2": self.beta2,
            "tau": self.tau,
            "steps": self.steps,
            "m": None if self.m is None else self.m.copy(),
            "v": None if self.v is None else self.v.copy(),
        }


class FedAdagrad(AdaptiveOptimizer):
    """``v <- v + g^2`` (``beta2`` unused)."""

    name = "adagrad"

    def second_moment(self, v: F64, g2: F64) -> F64:
        return v + g2


class FedAdam(AdaptiveOptimizer):
    """``v <- beta2 * v + (1 - beta2) * g^2``."""

    name = "adam"

    def second_moment(self, v: F64, g2: F64) -> F64:
        return self.beta2 * v + (1.0 - self.beta2) * g2


class FedYogi(AdaptiveOptimizer):
    """``v <- v - (1 - beta2) * g^2 * sign(v - g^2)``: ``v`` grows at most additively."""

    name = "yogi"

    def second_moment(self, v: F64, g2: F64) -> F64:
        return v - (1.0 - self.beta2) * g2 * np.sign(v - g2)


ADAPTIVE_CLASSES: Final[Mapping[str, type[AdaptiveOptimizer]]] = {
    c.name: c for c in (FedAdagrad, FedAdam, FedYogi)
}


def adaptive_optimizer(
    name: str,
    lr: float,
    beta1: float = DEFAULT_BETA1,
    beta2: float = DEFAULT_BETA2,
    tau: float = DEFAULT_TAU,
) -> AdaptiveOptimizer:
    """A fresh adaptive optimizer by name (``adagrad``, ``adam`` or ``yogi``)."""
    cls = ADAPTIVE_CLASSES.get(name)
    if cls is None:
        raise ValueError(f"unknown adaptive optimizer {name!r}, expected one of {ADAPTIVE}")
    return cls(lr, beta1, beta2, tau)
