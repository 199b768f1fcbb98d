"""The Gaussian mechanism on clipped deltas: the math of one differentially private release.

Sensitivity argument (user-level, add-or-remove-one-device neighbouring relation). A release is

    R = (sum_i w_i * clip(delta_i, C) + N(0, (sigma * m * C)^2 I)) / n

over the rows of one buffer, where ``clip`` scales a row down to L2 norm <= C, every weight
``w_i`` (the staleness discount) is in [0, 1], one device holds at most ``m`` rows of the buffer
(``[strategy] max_per_device``) and ``n`` is a constant fixed by the configuration (the buffer
size K), not the number of rows actually present. Adding or removing one device changes the
weighted sum by at most ``m * C`` in L2 norm, so the noised sum is the Gaussian mechanism with
noise multiplier ``sigma`` relative to its sensitivity; dividing by the public constant ``n``
and everything done afterwards (server optimizer, momentum, publishing) is post-processing and
costs no privacy. The noise on the mean of a full buffer is therefore ``sigma * m * C / K`` per
coordinate. Rows are NOT weighted by their self-reported sample counts: such a weight could give
one device all of the mean and break the bound. A coordinate-wise median or trimmed mean has no
such bound (one row can move it by up to the gap between order statistics, in every
coordinate), so only this clipped sum is released with noise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedmqtt.aggregation._common import all_finite, batch, row_weights
from fedmqtt.params import F32

# A clipped row's norm is bound * (1 - 1e-6): float rounding never lands above the bound.
_SHRINK = 1.0 - 1e-6


def gaussian_release(
    rows: F32,
    weights: Any,
    *,
    clip: float,
    sigma: float,
    rows_per_device: int,
    denominator: float,
    rng: np.random.Generator,
) -> tuple[F32, F32]:
    """``(sum_i w_i clip(x_i) + N(0, (sigma m C)^2)) / denominator`` and the noise added to the
    sum (for tests and metrics). ``weights`` in [0, 1]; ``rows`` is not modified."""
    x = batch(rows)
    k, d = x.shape
    w = row_weights(weights, k, "weights")
    if (w > 1).any():
        raise ValueError("release weights must be in [0, 1] for the sensitivity bound to hold")
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be finite and > 0, got {clip!r}")
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ValueError(f"sigma must be finite and >= 0, got {sigma!r}")
    if rows_per_device < 1:
        raise ValueError("rows_per_device must be >= 1 (an unbounded device has no sensitivity)")
    if not (math.isfinite(denominator) and denominator > 0):
        raise ValueError(f"denominator must be finite and > 0, got {denominator!r}")
    # Each row's clip factor, folded with its weight into one coefficient, then one float32
    # BLAS pass over the rows: no (K, d) copy of the buffer. The squared norm is a float32 dot
    # product; a sum of d non-negative float32 terms is within a relative d * 2^-23 of the
    # exact value (recursive summation; BLAS's blocked sums are tighter), so the norm is taken
    # that much larger: a clipped row ends up at most C (slightly below it), never above.
    inflate = 1.0 + d * 2.0**-23
    coef = np.empty(k, dtype=np.float64)
    for i in range(k):
        with np.errstate(over="ignore"):
            sq = float(np.dot(x[i], x[i]))
        norm = math.sqrt(sq * inflate)  # inf for a row beyond float32's range: weight 0
        coef[i] = w[i] * (min(1.0, clip / norm * _SHRINK) if norm > 0 else 1.0)
    total = coef.astype(np.float32) @ x
    std = sigma * rows_per_device * clip
    noise: F32 = np.zeros(d, dtype=np.float32)
    if std > 0:
        noise = np.asarray(rng.standard_normal(d, dtype=np.float32), dtype=np.float32)
        noise *= np.float32(std)
        total += noise
    total /= np.float32(denominator)
    if not all_finite(total):
        raise ValueError("private release is not finite in float32 (overflow)")
    return total, noise
