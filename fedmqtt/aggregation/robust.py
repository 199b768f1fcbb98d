"""Defences against faulty or malicious updates: norm clipping and robust reducers.

Coordinate-wise trimmed mean and median, whose error is bounded when a fraction of the rows is
arbitrary (Byzantine), are from

    Dong Yin, Yudong Chen, Kannan Ramchandran, Peter Bartlett. "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates." ICML 2018, arXiv:1803.01498.

Bounding the L2 norm of each update limits what any single device can do to the model; it is
the defence evaluated in

    Ziteng Sun, Peter Kairouz, Ananda Theertha Suresh, H. Brendan McMahan. "Can You Really
    Backdoor Federated Learning?" arXiv:1911.07963 (2019).

A fixed bound has to be tuned per model, so :class:`NormBound` derives it from the data:
``factor`` times the median norm of recently accepted updates. This follows the idea of
adapting the clipping norm to the observed norms (Galen Andrew, Om Thakkar, H. Brendan McMahan,
Swaroop Ramaswamy, "Differentially Private Learning with Adaptive Clipping", NeurIPS 2021,
arXiv:1905.03871, which tracks a quantile privately); here a plain median is enough because
the goal is robustness, not privacy.

Reducers sort each column chunk in float64 (``np.partition``, linear time per coordinate) and
average the kept order statistics in float64; chunking bounds memory (see ``_common``).
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fedmqtt.aggregation._common import F64, batch, column_chunks, saturate_f32, to_f32
from fedmqtt.params import F32

# Scaled rows are rounded to float32 element by element (relative error <= 2**-24 each), which
# could leave the clipped norm a hair above the bound; shrinking the scale by 2**-22 keeps it
# <= bound for values in float32's normal range.
_CLIP_SHRINK = 1.0 - 2.0**-22


def clip_by_norm(deltas: F32, bound: float) -> tuple[F32, F32]:
    """Scale every row whose L2 norm exceeds ``bound`` down to norm ``bound``.

    Returns ``(clipped, norms)``: a new (K, d) float32 batch, in which rows with norm <= bound
    are exact copies and longer rows keep their direction, and the original row norms as
    float32 (computed in float64; a norm beyond float32's range is reported as float32's
    maximum). ``bound`` must be finite and >= 0; an empty batch (K = 0) is allowed.
    """
    x = batch(deltas, allow_empty=True)
    limit = float(bound)
    if not (math.isfinite(limit) and limit >= 0):
        raise ValueError(f"bound must be finite and >= 0, got {bound!r}")
    k, d = x.shape
    squares = np.zeros(k, dtype=np.float64)
    for a, b in column_chunks(k, d):
        block = x[:, a:b].astype(np.float64)
        squares += np.einsum("ij,ij->i", block, block)
    norms = np.sqrt(squares)
    out = x.copy()
    for i in np.flatnonzero(norms > limit):
        # float64 scalar: the product is computed in float64 and rounded to float32 once.
        np.multiply(x[i], np.float64(limit / norms[i] * _CLIP_SHRINK), out=out[i])
    return out, saturate_f32(norms)


class NormBound:
    """Adaptive norm bound: ``factor`` x the running median of accepted update norms.

    Feed :meth:`observe` the (unclipped) norm of every update that was *accepted*, never of
    rejected ones, so that a burst of huge updates cannot raise the bound: to move a median an
    attacker needs half the window. :meth:`bound` is None until ``min_samples`` norms have been
    seen (there is nothing to compare with yet); the caller then accepts without clipping or
    uses a configured bound.
    """

    def __init__(self, factor: float = 3.0, window: int = 100, min_samples: int = 5) -> None:
        f = float(factor)
        if not (math.isfinite(f) and f > 0):
            raise ValueError(f"factor must be finite and > 0, got {factor!r}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be an integer >= 1, got {window!r}")
        if (
            isinstance(min_samples, bool)
            or not isinstance(min_samples, int)
            or not 1 <= min_samples <= window
        ):
            raise ValueError(f"min_samples must be an integer in [1, window], got {min_samples!r}")
        self.factor = f
        self.window = window
        self.min_samples = min_samples
        self._norms: deque[float] = deque(maxlen=window)
        # The same norms kept sorted, so that the median is a lookup: the aggregator asks for
        # it for every update (statistics.median sorted the window each time, ~2 % of the
        # aggregator's CPU at d = 1e5).
        self._sorted: list[float] = []

    def observe(self, norm: float) -> None:
        """Record the norm of an accepted update (finite, >= 0); the oldest beyond the window
        is forgotten."""
        v = float(norm)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"norm must be finite and >= 0, got {norm!r}")
        if len(self._norms) == self.window:
            del self._sorted[bisect.bisect_left(self._sorted, self._norms[0])]
        self._norms.append(v)
        bisect.insort(self._sorted, v)

    def bound(self) -> float | None:
        """``factor * median`` of the remembered norms, or None before ``min_samples``."""
        if len(self._norms) < self.min_samples:
            return None
        s, n = self._sorted, len(self._sorted)
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2.0
        return self.factor * mid

    def __len__(self) -> int:
        return len(self._norms)

    def __repr__(self) -> str:
        return (
            f"NormBound(factor={self.factor}, window={self.window}, "
            f"min_samples={self.min_samples}, seen={len(self._norms)}, bound={self.bound()})"
        )

    def to_state(self) -> dict[str, Any]:
        """Plain python (JSON/msgpack-able) state: the settings and the remembered norms."""
        return {
            "factor": self.factor,
            "window": self.window,
            "min_samples": self.min_samples,
            "norms": list(self._norms),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> NormBound:
        """A new NormBound equal to the one that produced ``state`` (ValueError if invalid)."""
        try:
            nb = cls(state["factor"], state["window"], state["min_samples"])
            norms: Iterable[Any] = state["norms"]
        except (KeyError, TypeError) as exc:
            raise ValueError(f"invalid NormBound state: {exc!r}") from None
        values = list(norms)
        if len(values) > nb.window:
            raise ValueError(f"NormBound state has {len(values)} norms for window {nb.window}")
        for v in values:
            nb.observe(v)
        return nb


def _trim_count(k: int, trim_fraction: float) -> int:
    t = float(trim_fraction)
    if not 0.0 <= t < 0.5:  # also refuses NaN
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction!r}")
    # The epsilon keeps e.g. 0.29 * 100 = 28.999999999999996 from flooring to 28.
    return math.floor(t * k + 1e-9)


def _reduce_columns(x: F32, row_scale: F64 | None, reduce: Callable[[F64], F64], what: str) -> F32:
    """Apply ``reduce`` (float64 block (K, c) -> (c,), may modify the block) chunk by chunk to
    the rows ``row_scale_i * x_i`` without materialising them."""
    k, d = x.shape
    out = np.empty(d, dtype=np.float64)
    for a, b in column_chunks(k, d):
        block = x[:, a:b].astype(np.float64)
        if row_scale is not None:
            block *= row_scale[:, None]
        out[a:b] = reduce(block)
    return to_f32(out, what)


def _trimmed_mean(x: F32, trim_fraction: float, row_scale: F64 | None = None) -> F32:
    k = x.shape[0]
    cut = _trim_count(k, trim_fraction)

    def reduce(block: F64) -> F64:
        if cut:
            block.partition(sorted({cut, k - cut - 1}), axis=0)
        kept: F64 = block[cut : k - cut].mean(axis=0)
        return kept

    return _reduce_columns(x, row_scale, reduce, "trimmed_mean result")


def _coordinate_median(x: F32, row_scale: F64 | None = None) -> F32:
    k = x.shape[0]
    lo, hi = (k - 1) // 2, k // 2

    def reduce(block: F64) -> F64:
        block.partition(sorted({lo, hi}), axis=0)
        mid: F64 = (block[lo] + block[hi]) * 0.5
        return mid

    return _reduce_columns(x, row_scale, reduce, "coordinate_median result")


def trimmed_mean(deltas: F32, trim_fraction: float) -> F32:
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    For each coordinate drops the ``floor(trim_fraction * K)`` largest and as many smallest
    values and averages the rest; ``trim_fraction`` in [0, 0.5), and 0 gives the plain mean.
    Tolerates up to that many arbitrary rows per coordinate.
    """
    x = batch(deltas)
    return _trimmed_mean(x, trim_fraction)


def coordinate_median(deltas: F32) -> F32:
    """Coordinate-wise median (Yin et al. 2018); for even K the mean of the two middle values.

    The median of order statistics is computed in float64, so it neither overflows nor
    depends on the order of the rows.
    """
    x = batch(deltas)
    return _coordinate_median(x)
