"""Export a global model (:class:`ModelSpec` + :data:`Params`) as a standard-ops ONNX graph.

Why these choices:

* **Standard operators only** (``Sub``, ``Mul``, ``MatMul``, ``Add``, ``Relu``, ``Softmax``,
  ``ArgMax``, ``Gather``; autoencoders also ``ReduceMean``, ``Greater``, ``Cast``), no
  ``ai.onnx.ml`` domain: minimal runtimes (onnxruntime "minimal"
  and mobile builds, tract, microcontroller converters) often ship without the ML operator set.
* **Opset 17, IR version 8**: opset 17 is the newest opset that onnxruntime 1.13 (late 2022)
  and every later release executes, and IR 8 is the matching file format; onnx 1.23 would stamp
  IR 12 by default, which onnxruntime releases before 1.20 refuse to load. Nothing here needs a
  newer operator version (Softmax-13 already normalises along one axis, ArgMax-13 has
  ``select_last_index``).
* **The graph mirrors** :func:`fedmqtt.models.dense.forward` **step by step in float32**:
  ``(x - offset) * scale`` as separate ``Sub``/``Mul`` (not folded into the first layer, which
  would change the rounding), ``MatMul`` then ``Add`` per layer as numpy computes
  ``h @ W + b``, and ``ArgMax`` over the *probabilities*, as ``predict`` does, so labels agree
  exactly with the numpy model (including the first-index rule on ties).
* **Preprocessing is in the graph**, so a device feeds the raw values it measures.
* **Labels, not indices**: ``ArgMax`` gives an output index, a ``Gather`` on a constant tensor of
  the spec's class labels turns it into the label a person expects.

Graph interface (``N`` is a dynamic batch dimension)::

    input  features       float32 [N, n_features]
    output label          int64   [N]              classifiers (kind softmax, mlp)
           probabilities  float32 [N, n_classes]   classifiers, columns in ``classes`` order
           prediction     float32 [N, n_outputs]   regression (kind linear)
           score          float32 [N]              autoencoder: mean squared reconstruction
                                                   error of the preprocessed features
           decision       int64   [N]              autoencoder: 1 if score > threshold, else 0

An autoencoder's graph ends ``Sub(x', reconstruction)``, ``Mul`` (square), ``ReduceMean`` over
the features, as :func:`fedmqtt.models.anomaly.anomaly_scores` computes it, then ``Greater``
against the version's threshold (a constant of the graph; +inf, i.e. nothing flagged, while
no device has reported a score quantile yet) and ``Cast`` to int64.

Metadata (``ModelProto.metadata_props``, all strings): ``fedmqtt.federation``,
``fedmqtt.version``, ``fedmqtt.kind``, ``fedmqtt.n_features``, ``fedmqtt.n_outputs``,
``fedmqtt.feature_names`` (JSON list, empty when the spec names none), ``fedmqtt.classes``
(JSON list of labels, ``null`` for regression), ``fedmqtt.threshold`` and
``fedmqtt.quantile`` (autoencoders: the threshold, ``null`` if none yet, and the quantile level
it estimates), ``fedmqtt.created_at`` (Unix seconds),
``fedmqtt.created_at_utc`` (ISO 8601), ``fedmqtt.spec_fingerprint``. ``model_version`` holds
the version too, and ``producer_name`` is ``fedmqtt``.

This module imports ``onnx`` at top level: it is only imported where an export is wanted
(aggregator, on-the-fly export on a device), never by ``import fedmqtt``.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from collections.abc import Mapping
from typing import Any, Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import fedmqtt
from fedmqtt.models.anomaly import quantile_level
from fedmqtt.models.dense import check_params
from fedmqtt.models.sklearn_adapters import from_sklearn
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params

__all__ = [
    "DECISION_OUTPUT",
    "INPUT_NAME",
    "IR_VERSION",
    "LABEL_OUTPUT",
    "METADATA_PREFIX",
    "OPSET",
    "PREDICTION_OUTPUT",
    "PROBABILITIES_OUTPUT",
    "SCORE_OUTPUT",
    "build_model_proto",
    "export_onnx",
    "export_sklearn",
    "read_metadata",
]

OPSET: Final = 17
IR_VERSION: Final = 8
INPUT_NAME: Final = "features"
LABEL_OUTPUT: Final = "label"
PROBABILITIES_OUTPUT: Final = "probabilities"
PREDICTION_OUTPUT: Final = "prediction"
SCORE_OUTPUT: Final = "score"
DECISION_OUTPUT: Final = "decision"
METADATA_PREFIX: Final = "fedmqtt."
_BATCH: Final = "N"


def _metadata(
    spec: ModelSpec,
    *,
    federation: str,
    version: int,
    created_at: float,
    threshold: float | None = None,
) -> dict[str, str]:
    try:
        created_utc = _dt.datetime.fromtimestamp(created_at, tz=_dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"created_at {created_at!r} is not a usable Unix time") from None
    classes: list[int] | None = list(spec.labels) if spec.is_classifier else None
    values: dict[str, str] = {
        "federation": federation,
        "version": str(version),
        "kind": spec.kind,
        "n_features": str(spec.n_features),
        "n_outputs": str(spec.n_outputs),
        "feature_names": json.dumps(list(spec.feature_names)),
        "classes": json.dumps(classes),
        "created_at": repr(float(created_at)),
        "created_at_utc": created_utc.isoformat(timespec="milliseconds"),
        "spec_fingerprint": spec.fingerprint(),
    }
    if spec.is_autoencoder:
        values["threshold"] = json.dumps(threshold)
        values["quantile"] = repr(quantile_level(spec))
    return {METADATA_PREFIX + k: v for k, v in values.items()}


def _f32(values: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.ascontiguousarray(np.asarray(values, dtype=np.float32))


def build_model_proto(
    spec: ModelSpec,
    params: Mapping[str, np.ndarray[Any, Any]],
    *,
    federation: str,
    version: int,
    created_at: float,
    threshold: float | None = None,
) -> onnx.ModelProto:
    """The checked :class:`onnx.ModelProto` for ``(spec, params)``; see the module docstring.

    ``threshold`` is the autoencoder's decision threshold (ignored for the other kinds).
    """
    check_params(spec, params)
    if threshold is not None and not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be finite and >= 0, not {threshold!r}")
    if version < 0:
        raise ValueError(f"model version must be >= 0, got {version}")
    if not np.isfinite(created_at):
        raise ValueError("created_at must be a finite Unix time")
    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    h = INPUT_NAME
    if spec.feature_offset:
        inits.append(numpy_helper.from_array(_f32(spec.feature_offset), "feature_offset"))
        nodes.append(helper.make_node("Sub", [h, "feature_offset"], ["x_centered"], "center"))
        h = "x_centered"
    if spec.feature_scale:
        inits.append(numpy_helper.from_array(_f32(spec.feature_scale), "feature_scale"))
        nodes.append(helper.make_node("Mul", [h, "feature_scale"], ["x_scaled"], "scale"))
        h = "x_scaled"
    x_in = h

    n_layers = len(spec.hidden) + 1
    for i in range(n_layers):
        w, b = _f32(params[f"W{i}"]), _f32(params[f"b{i}"])
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise ValueError(f"layer {i} has NaN or Inf weights; refusing to export")
        inits += [numpy_helper.from_array(w, f"W{i}"), numpy_helper.from_array(b, f"b{i}")]
        last = i == n_layers - 1
        out_name = (
            "logits"
            if spec.is_classifier
            else "reconstruction"
            if spec.is_autoencoder
            else PREDICTION_OUTPUT
        )
        z = out_name if last else f"z{i + 1}"
        nodes.append(helper.make_node("MatMul", [h, f"W{i}"], [f"{z}_matmul"], f"matmul{i}"))
        nodes.append(helper.make_node("Add", [f"{z}_matmul", f"b{i}"], [z], f"bias{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [z], [f"h{i + 1}"], f"relu{i}"))
            z = f"h{i + 1}"
        h = z

    k = spec.n_outputs
    if spec.is_classifier:
        labels = np.asarray(spec.labels, dtype=np.int64)
        inits.append(numpy_helper.from_array(labels, "class_labels"))
        nodes += [
            helper.make_node("Softmax", [h], [PROBABILITIES_OUTPUT], "softmax", axis=1),
            helper.make_node(
                "ArgMax",
                [PROBABILITIES_OUTPUT],
                ["class_index"],
                "argmax",
                axis=1,
                keepdims=0,
                select_last_index=0,
            ),
            helper.make_node(
                "Gather", ["class_labels", "class_index"], [LABEL_OUTPUT], "index_to_label", axis=0
            ),
        ]
        outputs = [
            helper.make_tensor_value_info(LABEL_OUTPUT, TensorProto.INT64, [_BATCH]),
            helper.make_tensor_value_info(PROBABILITIES_OUTPUT, TensorProto.FLOAT, [_BATCH, k]),
        ]
    elif spec.is_autoencoder:
        t = np.float32(np.inf if threshold is None else threshold)
        inits.append(numpy_helper.from_array(np.asarray(t, dtype=np.float32), "threshold"))
        nodes += _score_nodes(x_in, h)
        outputs = [
            helper.make_tensor_value_info(SCORE_OUTPUT, TensorProto.FLOAT, [_BATCH]),
            helper.make_tensor_value_info(DECISION_OUTPUT, TensorProto.INT64, [_BATCH]),
        ]
    else:
        outputs = [helper.make_tensor_value_info(PREDICTION_OUTPUT, TensorProto.FLOAT, [_BATCH, k])]

    graph = helper.make_graph(
        nodes,
        f"fedmqtt_{spec.kind}",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [_BATCH, spec.n_features])],
        outputs,
        initializer=inits,
        doc_string=(
            f"fedmqtt {spec.kind} model, federation {federation!r}, version {version}: "
            f"layers {spec.layer_sizes()}"
        ),
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="fedmqtt",
        producer_version=fedmqtt.__version__,
        ir_version=IR_VERSION,
        model_version=version,
        doc_string="Feed raw features; preprocessing is part of the graph.",
    )
    helper.set_model_props(
        model,
        _metadata(
            spec,
            federation=federation,
            version=version,
            created_at=created_at,
            threshold=threshold,
        ),
    )
    onnx.checker.check_model(model, full_check=True)
    return model


def _score_nodes(x_in: str, reconstruction: str) -> list[onnx.NodeProto]:
    """Anomaly score (mean squared reconstruction error) and the 0/1 decision."""
    return [
        helper.make_node("Sub", [x_in, reconstruction], ["residual"], "residual"),
        helper.make_node("Mul", ["residual", "residual"], ["squared_error"], "square"),
        helper.make_node(
            "ReduceMean", ["squared_error"], [SCORE_OUTPUT], "score", axes=[1], keepdims=0
        ),
        helper.make_node("Greater", [SCORE_OUTPUT, "threshold"], ["is_anomaly"], "compare"),
        helper.make_node("Cast", ["is_anomaly"], [DECISION_OUTPUT], "decide", to=TensorProto.INT64),
    ]


def export_onnx(
    spec: ModelSpec,
    params: Params,
    *,
    federation: str,
    version: int,
    created_at: float,
    threshold: float | None = None,
) -> bytes:
    """Serialized ONNX ModelProto of the global model; ``onnx.checker`` has passed on it.

    Deterministic: the same arguments give the same bytes. ``threshold``: an autoencoder's
    decision threshold (:attr:`fedmqtt.wire.GlobalModel.threshold`).
    """
    model = build_model_proto(
        spec,
        params,
        federation=federation,
        version=version,
        created_at=created_at,
        threshold=threshold,
    )
    data: bytes = model.SerializeToString()
    return data


def export_sklearn(
    est: Any, *, federation: str = "", version: int = 0, created_at: float | None = None
) -> bytes:
    """Export a fitted scikit-learn estimator (converted by ``sklearn_adapters.from_sklearn``).

    Supported: ``LogisticRegression``, ``SGDClassifier``, ``SGDRegressor``, ``MLPClassifier``
    (ReLU). Labels equal the estimator's ``predict``; probabilities equal its ``predict_proba``
    except for multiclass ``SGDClassifier``, whose one-vs-rest probabilities are not a softmax
    (the graph outputs the softmax of its scores, like the numpy model).
    """
    spec, params = from_sklearn(est)
    return export_onnx(
        spec,
        params,
        federation=federation,
        version=version,
        created_at=time.time() if created_at is None else created_at,
    )


def read_metadata(model_bytes: bytes) -> dict[str, str]:
    """All ``metadata_props`` of a serialized model (keys keep their ``fedmqtt.`` prefix).

    Raises ``ValueError`` if the bytes are not an ONNX model.
    """
    model = onnx.ModelProto()
    try:
        model.ParseFromString(model_bytes)
    except Exception as e:  # protobuf raises DecodeError, and RuntimeWarning-ish types on junk
        raise ValueError(f"not an ONNX model: {type(e).__name__}: {e}") from None
    if not model.HasField("graph"):
        raise ValueError("not an ONNX model: it has no graph")
    return {p.key: p.value for p in model.metadata_props}
