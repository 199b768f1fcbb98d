"""The federated decision threshold of an anomaly-detection model, from per-device reports.

Each device reports, with its update, a few quantiles of the anomaly scores of its own data
under the model version it started training from: the values ``Q_i(l)`` at the levels ``l`` of
:func:`fedmqtt.models.anomaly.report_levels` (the threshold's level ``q`` and a ladder below
and above it). No score leaves the device.

The estimator. The aggregator keeps the most recent report of every device. A report describes
the device's score distribution function ``F_i`` at a few points; between them it is taken as
linear (through ``F_i(0) = 0``, scores being >= 0), and above the highest reported quantile
its tail is exponential, ``1 - F_i(t) = (1 - l_top) exp(-(t - Q_top) / b)``, with ``b`` fitted
to the two highest points (squared reconstruction errors have tails of that kind); a report
with a single point, or a flat top, keeps ``F_i`` at its top level instead, which counts the
rest of its tail as above any threshold. When version ``v`` is made, the threshold is the
``q``-quantile of the pooled distribution of the devices whose report is fresh (base version
at least ``v - max_age``; older reports describe a model that has since changed)::

    threshold(v) = t  such that  sum_i n_i F_i(t) = q * sum_i n_i

found by bisection. This is the quantile of the pooled scores up to the interpolation between
reported levels, whatever the devices' data: unlike an average of per-device quantiles, a
device whose scores run higher than the others' (another machine, another room) moves it as
much as its share of the samples warrants. Every device counts once whatever its update rate
(FedAsync makes a version per update). With no fresh report the previous threshold stands.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["QuantileReport", "ThresholdEstimator", "check_points", "pooled_quantile"]

Points = tuple[tuple[float, float], ...]  # (level, score quantile), levels increasing


@dataclass(frozen=True, slots=True)
class QuantileReport:
    points: Points
    num_samples: int
    base_version: int


def check_points(points: Sequence[Sequence[float]]) -> Points:
    """``points`` as (level, value) pairs sorted by level, if they can describe a distribution
    of scores: levels in (0, 1) and distinct, values finite, >= 0 and non-decreasing with the
    level, at least one pair. ValueError otherwise."""
    pts = sorted((float(lv), float(v)) for lv, v in points)
    if not pts:
        raise ValueError("a report needs at least one (level, quantile) pair")
    levels = [lv for lv, _ in pts]
    values = [v for _, v in pts]
    if not all(0.0 < lv < 1.0 for lv in levels) or len(set(levels)) != len(levels):
        raise ValueError("quantile levels must be distinct and in (0, 1)")
    if not all(math.isfinite(v) and v >= 0.0 for v in values):
        raise ValueError("score quantiles must be finite and >= 0")
    if any(b < a for a, b in itertools.pairwise(values)):
        raise ValueError("score quantiles must not decrease as the level grows")
    return tuple(pts)


def pooled_quantile(
    reports: Sequence[tuple[Points, int]], q: float, *, iterations: int = 60
) -> float:
    """The ``q``-quantile of the pooled distribution of ``(points, num_samples)`` reports
    (see the module docstring). Reports must have passed :func:`check_points`."""
    if not reports or not 0.0 < q < 1.0:
        raise ValueError("need at least one report and 0 < q < 1")
    k = max(len(p) for p, _ in reports)
    d = len(reports)
    top_x, top_f, scale = np.zeros(d), np.zeros(d), np.full(d, np.inf)
    for i, (pts, _) in enumerate(reports):
        (l_top, q_top) = pts[-1]
        top_x[i], top_f[i] = q_top, l_top
        if len(pts) > 1 and pts[-1][1] > pts[-2][1]:
            l_prev, q_prev = pts[-2]
            scale[i] = (q_top - q_prev) / math.log((1.0 - l_prev) / (1.0 - l_top))
    # Each row: (0, 0), the reported points, then its last point repeated (padding).
    xs = np.zeros((d, k + 1))
    fs = np.zeros((d, k + 1))
    for i, (pts, _) in enumerate(reports):
        row = [(0.0, 0.0), *((v, lv) for lv, v in pts)]
        row += [row[-1]] * (k + 1 - len(row))
        xs[i], fs[i] = zip(*row, strict=True)
    w = np.array([n for _, n in reports], dtype=np.float64)
    w /= w.sum()
    rows = np.arange(d)

    def cdf(t: float) -> float:
        j = np.minimum(np.sum(xs <= t, axis=1), k)  # first point above t (k: none above)
        x0, x1 = xs[rows, j - 1], xs[rows, j]
        f0, f1 = fs[rows, j - 1], fs[rows, j]
        span = np.where(x1 > x0, x1 - x0, 1.0)
        frac = np.where(x1 > x0, np.clip((t - x0) / span, 0.0, 1.0), 1.0)
        f = f0 + frac * (f1 - f0)
        tail = (t > top_x) & np.isfinite(scale)
        if tail.any():
            excess = (t - top_x[tail]) / scale[tail]
            f[tail] = 1.0 - (1.0 - top_f[tail]) * np.exp(-excess)
        return float(np.dot(w, f))

    lo, hi = 0.0, float(xs.max())
    reachable = float(np.dot(w, np.where(np.isfinite(scale), 1.0, top_f)))
    if reachable < q:  # flat tops below q: the largest reported value bounds the estimate
        return hi
    for _ in range(iterations):
        if cdf(hi) >= q:
            break
        lo, hi = hi, 2.0 * hi
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if cdf(mid) >= q:
            hi = mid
        else:
            lo = mid
    return hi


class ThresholdEstimator:
    """Latest quantile report per device and the threshold they give (see the module text).

    ``max_devices`` bounds the memory: beyond it, the report with the oldest base version is
    forgotten first.
    """

    def __init__(self, q: float, max_age: int, max_devices: int = 1_000_000) -> None:
        if not 0.0 < q < 1.0 or max_age < 0 or max_devices < 1:
            raise ValueError("need 0 < q < 1, max_age >= 0 and max_devices >= 1")
        self.q = q
        self.max_age = max_age
        self.max_devices = max_devices
        self.reports: dict[str, QuantileReport] = {}

    def __len__(self) -> int:
        return len(self.reports)

    def report(
        self,
        device: str,
        points: Sequence[Sequence[float]],
        num_samples: int,
        base_version: int,
    ) -> None:
        """Record ``device``'s report (replacing its previous one); ValueError if unusable."""
        pts = check_points(points)
        if num_samples < 1 or base_version < 0:
            raise ValueError("num_samples must be >= 1 and base_version >= 0")
        self.reports.pop(device, None)
        if len(self.reports) >= self.max_devices:
            oldest = min(self.reports, key=lambda d: self.reports[d].base_version)
            del self.reports[oldest]
        self.reports[device] = QuantileReport(pts, int(num_samples), int(base_version))

    def estimate(self, version: int) -> float | None:
        """The threshold for ``version``, or None when no report is fresh enough."""
        oldest = version - self.max_age
        fresh = [
            (r.points, r.num_samples) for r in self.reports.values() if r.base_version >= oldest
        ]
        return pooled_quantile(fresh, self.q) if fresh else None

    # ---- checkpoint ------------------------------------------------------------------------
    def to_state(self) -> dict[str, list[Any]]:
        devices = list(self.reports)
        return {
            "devices": devices,
            "points": [[list(p) for p in self.reports[d].points] for d in devices],
            "samples": [self.reports[d].num_samples for d in devices],
            "base_versions": [self.reports[d].base_version for d in devices],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the reports with a :meth:`to_state` map; ValueError if it is malformed."""
        cols = [list(state[k]) for k in ("devices", "points", "samples", "base_versions")]
        if len({len(c) for c in cols}) != 1:
            raise ValueError("threshold reports: columns of different lengths")
        self.reports = {}
        for d, p, n, b in zip(*cols, strict=True):
            self.report(str(d), p, int(n), int(b))
