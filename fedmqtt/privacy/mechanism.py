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

from fedmqtt.aggregation import clip_by_norm
from fedmqtt.aggregation._common import F64, batch, row_weights, to_f32
from fedmqtt.params import F32


def clip_rows(rows: F32, clip: float) -> tuple[F32, F32]:
    """Rows scaled down to L2 norm <= ``clip`` (new array) and the original norms."""
    return clip_by_norm(rows, clip)


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
    clipped, _ = clip_rows(x, clip)
    total = w @ clipped.astype(np.float64)
    std = sigma * rows_per_device * clip
    noise: F64 = np.zeros(d, dtype=np.float64)
    if std > 0:
        noise = np.multiply(rng.standard_normal(d), std)
    total += noise
    total /= denominator
    return to_f32(total, "private release"), noise.astype(np.float32)
