"""The federated decision threshold of an anomaly-detection model, from per-device reports.

Each device reports, with its update, one number: the empirical ``q``-quantile of the anomaly
scores of its own data under the model version it started training from
(:func:`fedmqtt.models.anomaly.score_quantile`). No score leaves the device.

The estimator. The aggregator keeps the most recent report of every device and, when it makes
version ``v``, sets the threshold to the sample-weighted mean of the reports whose base version
is at least ``v - max_age`` (older reports were measured on a model that has since changed
and are ignored, not deleted: a device that reports again replaces its entry)::

    threshold(v) = sum_i n_i q_i / sum_i n_i      over devices i with a fresh report

Every device counts once whatever its update rate, so a chatty device does not set the
threshold alone (FedAsync makes a version per update), and the weighting by samples makes it
the quantile of the pooled data when the devices' data are alike. When they are not, the mean
of per-device quantiles is not the quantile of the pooled data (it lies between the smallest
and largest device quantiles); ``bench/anomaly_quality.py`` measures the effect on F1. With
no fresh report the previous threshold stands.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["QuantileReport", "ThresholdEstimator"]


@dataclass(frozen=True, slots=True)
class QuantileReport:
    value: float
    num_samples: int
    base_version: int


def check_report_value(value: float) -> float:
    """``value`` if it can be a score quantile (finite, >= 0); ValueError otherwise."""
    v = float(value)
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"a score quantile must be finite and >= 0, not {value!r}")
    return v


class ThresholdEstimator:
    """Latest quantile report per device and the threshold they give (see the module text).

    ``max_devices`` bounds the memory: beyond it, the report with the oldest base version is
    forgotten first.
    """

    def __init__(self, max_age: int, max_devices: int = 1_000_000) -> None:
        if max_age < 0 or max_devices < 1:
            raise ValueError("max_age must be >= 0 and max_devices >= 1")
        self.max_age = max_age
        self.max_devices = max_devices
        self.reports: dict[str, QuantileReport] = {}

    def __len__(self) -> int:
        return len(self.reports)

    def report(self, device: str, value: float, num_samples: int, base_version: int) -> None:
        """Record ``device``'s report (replacing its previous one); ValueError if unusable."""
        v = check_report_value(value)
        if num_samples < 1 or base_version < 0:
            raise ValueError("num_samples must be >= 1 and base_version >= 0")
        self.reports.pop(device, None)
        if len(self.reports) >= self.max_devices:
            oldest = min(self.reports, key=lambda d: self.reports[d].base_version)
            del self.reports[oldest]
        self.reports[device] = QuantileReport(v, int(num_samples), int(base_version))

    def estimate(self, version: int) -> float | None:
        """The threshold for ``version``, or None when no report is fresh enough."""
        oldest = version - self.max_age
        total = weighted = 0.0
        for r in self.reports.values():
            if r.base_version >= oldest:
                total += r.num_samples
                weighted += r.num_samples * r.value
        if total == 0.0:
            return None
        return weighted / total

    # ---- checkpoint ------------------------------------------------------------------------
    def to_state(self) -> dict[str, list[Any]]:
        devices = list(self.reports)
        return {
            "devices": devices,
            "values": [self.reports[d].value for d in devices],
            "samples": [self.reports[d].num_samples for d in devices],
            "base_versions": [self.reports[d].base_version for d in devices],
        }

    def load_state(self, state: Mapping[str, Any]) -> None:
        """Replace the reports with a :meth:`to_state` map; ValueError if it is malformed."""
        cols = [list(state[k]) for k in ("devices", "values", "samples", "base_versions")]
        if len({len(c) for c in cols}) != 1:
            raise ValueError("threshold reports: columns of different lengths")
        self.reports = {}
        for d, v, n, b in zip(*cols, strict=True):
            self.report(str(d), float(v), int(n), int(b))
