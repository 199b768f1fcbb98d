"""ModelSpec: the architecture contract between aggregator, devices and the ONNX exporter.

Every model in the zoo is a dense network: ``hidden=()`` gives softmax regression (``kind=
"softmax"``) or linear regression (``kind="linear"``); ``kind="mlp"`` is a ReLU classifier with
1-2 hidden layers; ``kind="autoencoder"`` is a ReLU autoencoder with 1-3 hidden layers whose
narrowest layer is the bottleneck and whose output reconstructs the preprocessed input
(``n_outputs == n_features``; see :mod:`fedmqtt.models.anomaly`). Parameters are named
``W0, b0, W1, b1, ...`` with ``Wi`` of shape
``(fan_in, fan_out)``. Input preprocessing ``x' = (x - feature_offset) * feature_scale`` is part
of the spec (fixed, not trained) so that the numpy model and the ONNX graph apply the same
transformation and a device feeds raw sensor values.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import msgpack

from fedmqtt.errors import SCHEMA, DecodeError
from fedmqtt.params import Layout

Kind = Literal["softmax", "linear", "mlp", "autoencoder"]
KINDS: tuple[Kind, ...] = ("softmax", "linear", "mlp", "autoencoder")
# ``extra`` key of an autoencoder spec: the level of the quantile of normal anomaly scores
# that becomes the decision threshold (see fedmqtt.models.anomaly).
QUANTILE_KEY = "quantile"
MAX_FEATURES = 1_000_000
MAX_OUTPUTS = 100_000
MAX_PARAMS = 50_000_000


@dataclass(frozen=True)
class ModelSpec:
    kind: Kind
    n_features: int
    n_outputs: int
    hidden: tuple[int, ...] = ()
    # Labels of the output classes, in output order (classifiers only). Default 0..n_outputs-1.
    classes: tuple[int, ...] = ()
    feature_offset: tuple[float, ...] = ()
    feature_scale: tuple[float, ...] = ()
    feature_names: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model kind must be one of {KINDS}, not {self.kind!r}")
        if not 0 < self.n_features <= MAX_FEATURES or not 0 < self.n_outputs <= MAX_OUTPUTS:
            raise ValueError("n_features and n_outputs must be positive and within limits")
        if self.kind == "mlp" and not 1 <= len(self.hidden) <= 2:
            raise ValueError("an mlp has 1 or 2 hidden layers")
        if self.kind in ("softmax", "linear") and self.hidden:
            raise ValueError(f"a {self.kind} model has no hidden layers")
        if self.kind == "autoencoder":
            self._check_autoencoder()
        if any(h <= 0 for h in self.hidden):
            raise ValueError("hidden layer sizes must be positive")
        if self.kind == "softmax" and self.n_outputs < 2:
            raise ValueError("a classifier needs at least 2 classes")
        if self.classes and len(self.classes) != self.n_outputs:
            raise ValueError("classes must list one label per output")
        for name, vec in (
            ("feature_offset", self.feature_offset),
            ("feature_scale", self.feature_scale),
            ("feature_names", self.feature_names),
        ):
            if vec and len(vec) != self.n_features:
                raise ValueError(f"{name} must have n_features={self.n_features} entries")
        if self.layout().size > MAX_PARAMS:
            raise ValueError(f"model has more than {MAX_PARAMS} parameters")

    def _check_autoencoder(self) -> None:
        if not 1 <= len(self.hidden) <= 3:
            raise ValueError("an autoencoder has 1 to 3 hidden layers (the narrowest: bottleneck)")
        if self.n_outputs != self.n_features:
            raise ValueError("an autoencoder reconstructs its input: n_outputs == n_features")
        if self.classes:
            raise ValueError("an autoencoder has no classes")
        q = self.extra.get(QUANTILE_KEY, 0.99)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.5 <= q < 1.0:
            raise ValueError(f"extra.{QUANTILE_KEY} must be a number in [0.5, 1), not {q!r}")

    @property
    def is_classifier(self) -> bool:
        return self.kind in ("softmax", "mlp")

    @property
    def is_autoencoder(self) -> bool:
        return self.kind == "autoencoder"

    @property
    def labels(self) -> tuple[int, ...]:
        return self.classes or tuple(range(self.n_outputs))

    def layer_sizes(self) -> tuple[int, ...]:
        return (self.n_features, *self.hidden, self.n_outputs)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        sizes = self.layer_sizes()
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            shapes[f"W{i}"] = (fan_in, fan_out)
            shapes[f"b{i}"] = (fan_out,)
        return shapes

    def layout(self) -> Layout:
        return Layout.from_shapes(self.param_shapes())

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "kind": self.kind,
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "hidden": list(self.hidden),
        }
        if self.classes:
            out["classes"] = list(self.classes)
        if self.feature_offset:
            out["feature_offset"] = list(self.feature_offset)
        if self.feature_scale:
            out["feature_scale"] = list(self.feature_scale)
        if self.feature_names:
            out["feature_names"] = list(self.feature_names)
        if self.extra:
            out["extra"] = dict(self.extra)
        return out

    @classmethod
    def from_wire(cls, obj: object) -> ModelSpec:
        """Build a spec from its wire map; anything wrong raises :class:`DecodeError`."""
        if not isinstance(obj, dict):
            raise DecodeError(SCHEMA, "model spec must be a map")
        d = cast(dict[str, Any], obj)
        try:
            return cls(
                kind=d["kind"],
                n_features=_int(d["n_features"]),
                n_outputs=_int(d["n_outputs"]),
                hidden=tuple(_int(h) for h in d.get("hidden", ())),
                classes=tuple(_int(c) for c in d.get("classes", ())),
                feature_offset=tuple(float(x) for x in d.get("feature_offset", ())),
                feature_scale=tuple(float(x) for x in d.get("feature_scale", ())),
                feature_names=tuple(str(x) for x in d.get("feature_names", ())),
                extra=dict(d.get("extra", {})),
            )
        except KeyError as e:
            raise DecodeError(SCHEMA, f"model spec lacks field {e.args[0]!r}") from None
        except (TypeError, ValueError) as e:
            raise DecodeError(SCHEMA, f"bad model spec: {e}") from None

    def fingerprint(self) -> str:
        """Short stable hash of the architecture; an update must carry its model's fingerprint."""
        canon = msgpack.packb(self.to_wire(), use_bin_type=True)
        return hashlib.sha256(canon).hexdigest()[:16]


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"expected an integer, got {type(v).__name__}")
    return v
