"""FedAvg: the sample-weighted mean of client updates.

    H. Brendan McMahan, Eider Moore, Daniel Ramage, Seth Hampson, Blaise Aguera y Arcas.
    "Communication-Efficient Learning of Deep Networks from Decentralized Data."
    AISTATS 2017, arXiv:1602.05629.

Written on deltas (``client_w - base_w``): with all deltas from the same base ``w``, FedAvg's
``sum_i (n_i / n) w_i`` equals ``w + sum_i (n_i / n) delta_i``. The synchronous mode of the
aggregator uses it directly, and it is the reference that FedBuff reduces to when every update
is fresh (see :mod:`fedmqtt.aggregation.fedbuff`).

The weighted mean lives here once, in two accumulations of the same formula
``sum_i c_i * delta_i``:

* :func:`weighted_mean` and :func:`fedavg_step` (and ``fedbuff_aggregate(reducer="mean")``)
  check their input and accumulate in float64, in column chunks, then round to float32 once. A
  float32 accumulation over K = 100 rows can lose about K ulps; float64 makes the result the
  float32 rounding of the exact mean up to ~1e-16 relative, so it does not depend on the order
  of the rows (permutation invariance up to that last rounding) at the cost of converting each
  chunk (bounded memory, see ``_common``).
* :func:`mean_of_rows` is the aggregator's path (its strategies' buffers): no re-check of the
  rows, one float32 matrix-vector product, and int8 rows may keep their per-tensor scales.
  Tests check that it agrees with the float64 path to float32 precision.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmqtt.aggregation._common import (
    F64,
    batch,
    column_chunks,
    positive_total,
    row_weights,
    to_f32,
    vector,
)
from fedmqtt.params import F32


def _weighted_sum64(deltas: F32, coeffs: F64) -> F64:
    """``sum_i coeffs_i * deltas_i`` in float64 (inputs already validated)."""
    k, d = deltas.shape
    out = np.empty(d, dtype=np.float64)
    for a, b in column_chunks(k, d):
        np.matmul(coeffs, deltas[:, a:b].astype(np.float64), out=out[a:b])
    return out


def _weighted_mean64(deltas: F32, weights: F64) -> F64:
    total = positive_total(weights, "weights")
    return _weighted_sum64(deltas, weights / total)


def weighted_mean(deltas: F32, weights: F32) -> F32:
    """``sum_i weights_i * deltas_i / sum_i weights_i`` for a (K, d) batch and (K,) weights.

    Weights must be finite and >= 0 with a positive sum (a row of weight 0 is ignored);
    deltas must be finite. Raises ValueError otherwise or on inconsistent shapes.
    """
    x = batch(deltas)
    wts = row_weights(weights, x.shape[0], "weights")
    return to_f32(_weighted_mean64(x, wts), "weighted_mean result")


def fedavg_step(w: F32, deltas: F32, num_samples: F32) -> F32:
    """One FedAvg server step: ``w + weighted_mean(deltas, num_samples)`` as a new vector.

    The addition is done in float64 with the unrounded mean, so the result is rounded once.
    Raises ValueError on bad input (see :func:`weighted_mean`) or if the new model would
    overflow float32.
    """
    x = batch(deltas)
    w32 = vector(w, "w", x.shape[1])
    n = row_weights(num_samples, x.shape[0], "num_samples")
    out = _weighted_mean64(x, n)
    out += w32
    return to_f32(out, "fedavg_step result")


def mean_of_rows(
    x: F32,
    s: F32,
    n: F32,
    scales: F32 | None = None,
    segments: Sequence[tuple[int, int]] = (),
) -> F32:
    """FedBuff's mean ``sum_i (n_i / sum_j n_j) * s_i * x_i`` as one float32 matrix-vector
    product.

    With ``scales`` (``(len(x), len(segments))``), row ``i``'s values in segment ``t`` are
    ``scales[i, t] * x[i, segment t]``: one product per segment then takes each row's scale
    into its coefficient, instead of a pass over every row to apply it.

    It is the formula of ``fedbuff_aggregate(reducer="mean")`` (and, with every ``s_i = 1``, of
    :func:`weighted_mean`) without their input checks and float64 accumulation, which cost a
    read of every row and a float64 conversion of each chunk. The caller guarantees what they
    check: every row finite and of bounded norm (the aggregator checks both when it decodes an
    update), so a float32 sum of the rows cannot overflow; the float32 rounding of a sum of K
    terms (about K ulps) is far below the noise of SGD. ``num_samples`` ``n`` must have a
    positive sum (ValueError otherwise); a non-finite result is left for the caller to refuse
    (the server optimizer does).
    """
    total = float(np.sum(n, dtype=np.float64))
    if not total > 0:
        raise ValueError("num_samples must have a positive sum")
    coef = (n.astype(np.float64) / total * s).astype(np.float32)
    if scales is None or bool(np.all(scales == 1.0)):
        out: F32 = coef @ x
        return out
    if scales.shape != (len(x), len(segments)):
        raise ValueError(
            f"scales of shape {scales.shape} for {len(x)} rows, {len(segments)} tensors"
        )
    out = np.empty(x.shape[1], dtype=np.float32)
    for t, (a, b) in enumerate(segments):
        np.matmul(coef * scales[:, t], x[:, a:b], out=out[a:b])
    return out
