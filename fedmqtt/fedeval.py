"""Federated evaluation: the device's validation split, its report, and how reports combine.

The one place that owns

* the **validation split** a device never trains on (:func:`validation_mask`): a sample is in
  it when a keyed hash of its bytes (features and label) falls below the configured fraction.
  The choice depends on the sample alone, not on its position, so it stays the same as data
  grows, is reordered or is trimmed by ``max_samples``; equal samples land on the same side;
* the **metrics** a device computes on it (:func:`evaluate_params`): loss (the training loss:
  mean cross-entropy for classifiers, half the mean squared error for the linear model),
  accuracy for classifiers, R^2 and MAE for regression, and the sample count;
* the **report** on the wire (:class:`EvalReport`, body type ``eval`` on
  ``fl/<fed>/eval/<device>``), signed with the device's update key like its updates;
* the **combination** of the reports of one version (:func:`summarize`): sample-weighted means,
  the number of reporting devices, and the 10th / 90th percentile of the per-device metric.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedmqtt import wire
from fedmqtt.errors import SCHEMA, DecodeError
from fedmqtt.models.dense import encode_targets, forward
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params

EVAL_TYPE: Final = "eval"
MAX_REPORT_BYTES: Final = 4096  # a report is ~250 bytes; anything larger is refused (size)
MAX_METRICS: Final = 8
AGENT_VERSION_MAX: Final = 32
# The split's hash key: fixed, so a device's split never changes with configuration other than
# the fraction.
_SPLIT_KEY: Final = b"fedmqtt-validation-split-v1"
_SCALE: Final = float(1 << 64)

EVAL_FIELDS: Final = (
    wire.BodyField("v", int, const=wire.VERSION),
    wire.BodyField("type", str, const=EVAL_TYPE),
    wire.BodyField("federation", str),
    wire.BodyField("sender", str),
    wire.BodyField("version", int, lo=0),
    wire.BodyField("spec", str),
    wire.BodyField("num_samples", int, lo=1),
    wire.BodyField("loss", float, finite=True),
    wire.BodyField("metrics", dict, values=float),
    wire.BodyField("agent", str, hi=AGENT_VERSION_MAX),
    wire.BodyField("created_at", float, finite=True),
)
"""The evaluation report body: the one declaration of its fields, types and limits."""


def metric_names(spec: ModelSpec) -> tuple[str, ...]:
    """The metrics a report carries for this model: the first is the headline one."""
    return ("accuracy",) if spec.is_classifier else ("r2", "mae")


def headline_metric(spec: ModelSpec) -> str:
    return metric_names(spec)[0]


@dataclass(frozen=True)
class EvalReport:
    """One device's evaluation of one global version on its validation split."""

    federation: str
    sender: str
    version: int
    spec_fingerprint: str
    num_samples: int
    loss: float
    metrics: dict[str, float]
    agent: str = ""
    created_at: float = field(default_factory=time.time)

    def to_body(self) -> dict[str, Any]:
        return {
            "v": wire.VERSION,
            "type": EVAL_TYPE,
            "federation": self.federation,
            "sender": self.sender,
            "version": self.version,
            "spec": self.spec_fingerprint,
            "num_samples": self.num_samples,
            "loss": self.loss,
            "metrics": self.metrics,
            "agent": self.agent,
            "created_at": self.created_at,
        }

    @classmethod
    def from_body(cls, m: Mapping[str, Any]) -> EvalReport:
        f = wire._read(m, EVAL_FIELDS)
        metrics: dict[str, float] = f["metrics"]
        if len(metrics) > MAX_METRICS or not all(math.isfinite(v) for v in metrics.values()):
            raise DecodeError(SCHEMA, f"metrics must be at most {MAX_METRICS} finite numbers")
        if any(len(k) > 32 for k in metrics):
            raise DecodeError(SCHEMA, "metric names must be at most 32 characters")
        return cls(
            federation=f["federation"],
            sender=f["sender"],
            version=f["version"],
            spec_fingerprint=f["spec"],
            num_samples=f["num_samples"],
            loss=f["loss"],
            metrics=metrics,
            agent=f["agent"],
            created_at=f["created_at"],
        )

    def encode(self, signer: Any, *, compact: bool = True) -> bytes:
        return wire.seal(self.to_body(), signer, compact=compact)


def decode_report(env: wire.Envelope) -> EvalReport:
    """The report in an already verified envelope; raises only DecodeError."""
    body = wire.unpack_body(env, max_bytes=MAX_REPORT_BYTES)
    try:
        return EvalReport.from_body(body)
    except DecodeError:
        raise
    except Exception as e:  # defensive, as wire.parse
        raise DecodeError(SCHEMA, f"bad eval report: {type(e).__name__}: {e}") from None


# --------------------------------------------------------------------------- the split


def validation_mask(X: npt.NDArray[Any], y: npt.NDArray[Any], fraction: float) -> npt.NDArray[Any]:
    """True for the samples of the validation split (about ``fraction`` of them).

    Each sample is hashed with BLAKE2b (keyed) over its feature bytes (float32) and its label
    bytes; the first 8 bytes of the digest, read as a number in [0, 1), below ``fraction`` put
    it in the split. A sample's side depends on its values only.
    """
    n = int(X.shape[0])
    out = np.zeros(n, dtype=bool)
    if fraction <= 0.0 or n == 0:
        return out
    if fraction >= 1.0:
        out[:] = True
        return out
    xs = np.ascontiguousarray(X, dtype=np.float32).reshape(n, -1)
    ys = np.ascontiguousarray(y).reshape(n, -1)
    cut = fraction * _SCALE
    for i in range(n):
        h = hashlib.blake2b(xs[i].tobytes(), digest_size=8, key=_SPLIT_KEY)
        h.update(ys[i].tobytes())
        out[i] = int.from_bytes(h.digest(), "little") < cut
    return out


# --------------------------------------------------------------------------- the metrics


@dataclass(frozen=True)
class Evaluation:
    num_samples: int
    loss: float
    metrics: dict[str, float]


def evaluate_params(
    spec: ModelSpec, params: Params, X: npt.NDArray[Any], y: npt.NDArray[Any]
) -> Evaluation:
    """Loss and metrics of ``params`` on ``(X, y)``; ValueError on bad data or a non-finite
    result (never reported)."""
    n = int(X.shape[0])
    if n == 0:
        raise ValueError("no samples to evaluate on")
    out = forward(spec, params, X).astype(np.float64)
    targets = encode_targets(spec, y, np.float64)
    if spec.is_classifier:
        p = out[np.arange(n), targets]
        loss = float(np.mean(-np.log(np.maximum(p, 1e-12))))
        metrics = {"accuracy": float(np.mean(np.argmax(out, axis=1) == targets))}
    else:
        err = out - targets
        loss = float(0.5 * np.mean(np.square(err)))
        ss_res = np.sum(np.square(err), axis=0)
        ss_tot = np.sum(np.square(targets - targets.mean(axis=0)), axis=0)
        safe = ss_tot > 0
        r2 = np.where(safe, 1.0 - ss_res / np.where(safe, ss_tot, 1.0), 0.0)
        r2 = np.where(~safe & (ss_res == 0), 1.0, r2)  # as LinearRegression.score
        metrics = {"r2": float(np.mean(r2)), "mae": float(np.mean(np.abs(err)))}
    if not math.isfinite(loss) or not all(math.isfinite(v) for v in metrics.values()):
        raise ValueError("the evaluation is not finite")
    return Evaluation(n, loss, metrics)


# --------------------------------------------------------------------------- combining


@dataclass(frozen=True)
class DeviceEval:
    """What a version's summary keeps of one device's report."""

    num_samples: int
    loss: float
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalSummary:
    """The federated evaluation of one version.

    ``metric`` and ``loss`` are sample-weighted means over the reporting devices, ``metrics``
    the weighted mean of every metric reported by all of them; ``p10`` / ``p90`` are the 10th
    and 90th percentiles of the per-device headline metric (linear interpolation between the
    devices' values, unweighted: the spread across devices, not across samples).
    """

    version: int
    metric_name: str
    metric: float
    loss: float
    devices: int
    samples: int
    p10: float
    p90: float
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "metric_name": self.metric_name,
            "metric": round(self.metric, 6),
            "loss": round(self.loss, 6),
            "devices": self.devices,
            "samples": self.samples,
            "p10": round(self.p10, 6),
            "p90": round(self.p90, 6),
            "metrics": {k: round(v, 6) for k, v in sorted(self.metrics.items())},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalSummary:
        """The inverse of :meth:`to_dict` (ValueError / TypeError / KeyError if malformed)."""
        return cls(
            version=int(d["version"]),
            metric_name=str(d["metric_name"]),
            metric=float(d["metric"]),
            loss=float(d["loss"]),
            devices=int(d["devices"]),
            samples=int(d["samples"]),
            p10=float(d["p10"]),
            p90=float(d["p90"]),
            metrics={str(k): float(x) for k, x in dict(d["metrics"]).items()},
        )


def summarize(version: int, metric_name: str, reports: Sequence[DeviceEval]) -> EvalSummary | None:
    """Combine the reports of one version (None if there are none, or none has the metric)."""
    rows = [r for r in reports if metric_name in r.metrics]
    if not rows:
        return None
    w = np.array([r.num_samples for r in rows], dtype=np.float64)
    total = float(w.sum())
    per_device = np.array([r.metrics[metric_name] for r in rows], dtype=np.float64)
    common = set.intersection(*(set(r.metrics) for r in rows))
    means = {k: float(np.dot(w, [r.metrics[k] for r in rows]) / total) for k in sorted(common)}
    p10, p90 = np.percentile(per_device, [10, 90])
    return EvalSummary(
        version=version,
        metric_name=metric_name,
        metric=means[metric_name],
        loss=float(np.dot(w, [r.loss for r in rows]) / total),
        devices=len(rows),
        samples=int(total),
        p10=float(p10),
        p90=float(p90),
        metrics=means,
    )
