"""Conversion between scikit-learn estimators and (ModelSpec, Params).

For the aggregator and the simulator, which may start a federation from a model trained
centrally with scikit-learn or evaluate the global model with scikit-learn tooling. Devices
never import this module; scikit-learn is imported inside the functions only.

Supported: ``SGDClassifier`` and ``LogisticRegression`` (softmax spec), ``SGDRegressor``
(linear spec, one output) and ``MLPClassifier`` with ReLU and 1-2 hidden layers (mlp spec).

Binary classifiers in scikit-learn have a single score ``z = x @ coef + b`` and
``P(class 1) = sigmoid(z)``. It maps to a 2-output softmax whose first column is zero, because
``softmax([0, z]) = [1 - sigmoid(z), sigmoid(z)]``; back, ``coef = W[:, 1] - W[:, 0]``. The
zero column makes the conversion exact in both directions for estimator-born weights.

Multiclass ``SGDClassifier`` is one-vs-rest: its labels equal the softmax argmax, but its
``predict_proba`` normalises per-class sigmoids, so probabilities agree with :func:`forward`
only for ``LogisticRegression`` (multinomial) and ``MLPClassifier``.

scikit-learn estimators have no input preprocessing, so :func:`from_sklearn` returns a spec
without it, and :func:`to_sklearn` folds a spec's ``x' = (x - offset) * scale`` into the
first layer (``W' = scale[:, None] * W``, ``b' = b - (offset * scale) @ W``). That is
equivalent up to rounding but not bit-exact, and converting back yields a spec without
preprocessing (a different fingerprint).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fedmqtt.models.dense import check_params
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params

__all__ = ["from_sklearn", "to_sklearn"]

_F64 = npt.NDArray[np.float64]


def _estimator_name(est: object) -> str:
    return type(est).__name__


def _classes_tuple(est: Any) -> tuple[int, ...]:
    classes = np.asarray(est.classes_)
    if classes.ndim != 1:
        raise ValueError(f"{_estimator_name(est)} has multi-output classes_, which is unsupported")
    if classes.dtype.kind == "f" and np.all(np.isfinite(classes)):
        if not np.all(classes == np.floor(classes)):
            raise ValueError("classes_ must be integer labels for a ModelSpec")
        classes = classes.astype(np.int64)
    if classes.dtype.kind not in "iu":
        raise ValueError(
            f"{_estimator_name(est)}.classes_ has dtype {classes.dtype}; a ModelSpec carries "
            "integer labels only (encode the labels, e.g. with LabelEncoder, before fitting)"
        )
    return tuple(int(c) for c in classes)


def _feature_names(est: Any, n_features: int) -> tuple[str, ...]:
    names = getattr(est, "feature_names_in_", None)
    if names is None:
        return ()
    out = tuple(str(n) for n in names)
    return out if len(out) == n_features else ()


def _require_fitted(est: Any, attr: str) -> None:
    if not hasattr(est, attr):
        raise ValueError(f"{_estimator_name(est)} is not fitted (no {attr})")


def _linear_classifier_to_params(est: Any) -> tuple[ModelSpec, Params]:
    _require_fitted(est, "coef_")
    coef = np.asarray(est.coef_)
    if coef.ndim != 2:
        raise ValueError(f"{_estimator_name(est)}.coef_ must be 2-D, got shape {coef.shape}")
    classes = _classes_tuple(est)
    k, n_features = coef.shape
    intercept = np.broadcast_to(np.asarray(est.intercept_, dtype=np.float64), (k,))
    if len(classes) == 2 and k == 1:
        W = np.zeros((n_features, 2), dtype=np.float32)
        W[:, 1] = coef[0]
        b = np.zeros(2, dtype=np.float32)
        b[1] = intercept[0]
    elif len(classes) == k and k > 2:
        W = np.ascontiguousarray(coef.T, dtype=np.float32)
        b = np.array(intercept, dtype=np.float32)
    else:
        raise ValueError(f"{_estimator_name(est)}: coef_ shape {coef.shape} does not fit classes_")
    spec = ModelSpec(
        "softmax",
        n_features,
        len(classes),
        classes=classes,
        feature_names=_feature_names(est, n_features),
    )
    return spec, {"W0": W, "b0": b}


def _sgd_regressor_to_params(est: Any) -> tuple[ModelSpec, Params]:
    _require_fitted(est, "coef_")
    coef = np.asarray(est.coef_)
    if coef.ndim != 1:
        raise ValueError(f"SGDRegressor.coef_ must be 1-D, got shape {coef.shape}")
    n_features = coef.shape[0]
    intercept = np.broadcast_to(np.asarray(est.intercept_, dtype=np.float64), (1,))
    spec = ModelSpec("linear", n_features, 1, feature_names=_feature_names(est, n_features))
    params: Params = {
        "W0": np.array(coef.reshape(n_features, 1), dtype=np.float32),
        "b0": np.array(intercept, dtype=np.float32),
    }
    return spec, params


def _mlp_to_params(est: Any) -> tuple[ModelSpec, Params]:
    _require_fitted(est, "coefs_")
    if est.activation != "relu":
        raise ValueError(
            f"MLPClassifier with activation={est.activation!r} is unsupported: the mlp spec "
            "uses ReLU hidden layers"
        )
    coefs = [np.asarray(c) for c in est.coefs_]
    intercepts = [np.asarray(c) for c in est.intercepts_]
    n_hidden = len(coefs) - 1
    if not 1 <= n_hidden <= 2:
        raise ValueError(f"MLPClassifier with {n_hidden} hidden layers is unsupported (1 or 2)")
    classes = _classes_tuple(est)
    out_act = est.out_activation_
    n_out = coefs[-1].shape[1]
    params: Params = {}
    for i in range(n_hidden):
        params[f"W{i}"] = np.array(coefs[i], dtype=np.float32)
        params[f"b{i}"] = np.array(intercepts[i], dtype=np.float32)
    last = n_hidden
    if out_act == "logistic" and n_out == 1 and len(classes) == 2:
        fan_in = coefs[-1].shape[0]
        W = np.zeros((fan_in, 2), dtype=np.float32)
        W[:, 1] = coefs[-1][:, 0]
        b = np.zeros(2, dtype=np.float32)
        b[1] = intercepts[-1][0]
    elif out_act == "softmax" and n_out == len(classes) > 2:
        W = np.array(coefs[-1], dtype=np.float32)
        b = np.array(intercepts[-1], dtype=np.float32)
    else:
        raise ValueError(
            f"MLPClassifier with output activation {out_act!r} and {n_out} outputs for "
            f"{len(classes)} classes is unsupported (multilabel targets?)"
        )
    params[f"W{last}"] = W
    params[f"b{last}"] = b
    n_features = coefs[0].shape[0]
    spec = ModelSpec(
        "mlp",
        n_features,
        len(classes),
        hidden=tuple(int(c.shape[1]) for c in coefs[:-1]),
        classes=classes,
        feature_names=_feature_names(est, n_features),
    )
    return spec, params


def from_sklearn(est: Any) -> tuple[ModelSpec, Params]:
    """Spec and float32 parameters equivalent to a fitted scikit-learn estimator."""
    # Imported here, not at module level, so that importing fedmqtt never loads sklearn.
    from sklearn.linear_model import (
        LogisticRegression,
        SGDClassifier,
        SGDRegressor,
    )
    from sklearn.neural_network import MLPClassifier

    if isinstance(est, SGDClassifier | LogisticRegression):
        return _linear_classifier_to_params(est)
    if isinstance(est, SGDRegressor):
        return _sgd_regressor_to_params(est)
    if isinstance(est, MLPClassifier):
        return _mlp_to_params(est)
    raise ValueError(
        f"unsupported estimator {_estimator_name(est)}: use SGDClassifier, LogisticRegression, "
        "SGDRegressor or MLPClassifier"
    )


def _folded(spec: ModelSpec, params: Params) -> list[tuple[_F64, _F64]]:
    """Layers as float64 (W, b), with the spec's preprocessing folded into the first one."""
    n_layers = len(spec.hidden) + 1
    layers = [
        (np.asarray(params[f"W{i}"], dtype=np.float64), np.asarray(params[f"b{i}"], np.float64))
        for i in range(n_layers)
    ]
    if spec.feature_offset or spec.feature_scale:
        W, b = layers[0]
        scale = np.asarray(spec.feature_scale or (1.0,) * spec.n_features, dtype=np.float64)
        offset = np.asarray(spec.feature_offset or (0.0,) * spec.n_features, dtype=np.float64)
        layers[0] = (scale[:, None] * W, b - (offset * scale) @ W)
    return layers


def _binary_column(W: _F64, b: _F64) -> tuple[_F64, _F64]:
    """Single-logit form of a 2-output softmax layer: coefficient column and intercept."""
    return W[:, 1] - W[:, 0], np.array([b[1] - b[0]])


def _set_common(est: Any, spec: ModelSpec) -> None:
    est.n_features_in_ = spec.n_features
    if spec.feature_names:
        est.feature_names_in_ = np.asarray(spec.feature_names, dtype=object)
    elif hasattr(est, "feature_names_in_"):
        del est.feature_names_in_


def _write_linear_classifier(est: Any, spec: ModelSpec, params: Params) -> None:
    ((W, b),) = _folded(spec, params)
    if spec.n_outputs == 2:
        col, b1 = _binary_column(W, b)
        est.coef_ = col.reshape(1, -1)
        est.intercept_ = b1
    else:
        est.coef_ = np.ascontiguousarray(W.T)
        est.intercept_ = b.copy()
    est.classes_ = np.asarray(spec.labels, dtype=np.int64)
    _set_common(est, spec)


def _write_sgd_regressor(est: Any, spec: ModelSpec, params: Params) -> None:
    if spec.n_outputs != 1:
        raise ValueError(f"SGDRegressor has one output; the spec has {spec.n_outputs}")
    ((W, b),) = _folded(spec, params)
    est.coef_ = W[:, 0].copy()
    est.intercept_ = b.copy()
    _set_common(est, spec)


def _write_mlp(est: Any, spec: ModelSpec, params: Params) -> None:
    from sklearn.preprocessing import LabelBinarizer

    if est.activation != "relu":
        raise ValueError(f"MLPClassifier with activation={est.activation!r} is unsupported")
    layers = _folded(spec, params)
    coefs = [W for W, _ in layers]
    intercepts = [b for _, b in layers]
    if spec.n_outputs == 2:
        col, b1 = _binary_column(coefs[-1], intercepts[-1])
        coefs[-1] = col.reshape(-1, 1)
        intercepts[-1] = b1
        est.out_activation_ = "logistic"
    else:
        est.out_activation_ = "softmax"
    est.hidden_layer_sizes = spec.hidden
    est.coefs_ = coefs
    est.intercepts_ = intercepts
    est.n_layers_ = len(coefs) + 1
    est.n_outputs_ = coefs[-1].shape[1]
    classes = np.asarray(spec.labels, dtype=np.int64)
    est.classes_ = classes
    est._label_binarizer = LabelBinarizer().fit(classes)
    _set_common(est, spec)


def to_sklearn(spec: ModelSpec, params: Params, est: Any = None) -> Any:
    """A scikit-learn estimator that predicts like ``(spec, params)``.

    With ``est=None`` a new one is created: ``LogisticRegression`` for softmax specs,
    ``SGDRegressor`` for linear ones, ``MLPClassifier(activation="relu")`` for mlp ones.
    Given ``est`` (fitted or not, of a type matching the spec) the weights are written into it
    and it is returned. Only the attributes prediction needs are set; the estimator is not
    meant to be trained further with ``partial_fit``.
    """
    # Imported here, not at module level, so that importing fedmqtt never loads sklearn.
    from sklearn.linear_model import (
        LogisticRegression,
        SGDClassifier,
        SGDRegressor,
    )
    from sklearn.neural_network import MLPClassifier

    check_params(spec, params)
    if spec.kind == "softmax":
        if est is None:
            est = LogisticRegression()
        elif not isinstance(est, SGDClassifier | LogisticRegression):
            raise ValueError(f"a softmax spec cannot be written into {_estimator_name(est)}")
        _write_linear_classifier(est, spec, params)
    elif spec.kind == "linear":
        if est is None:
            est = SGDRegressor()
        elif not isinstance(est, SGDRegressor):
            raise ValueError(f"a linear spec cannot be written into {_estimator_name(est)}")
        _write_sgd_regressor(est, spec, params)
    else:
        if est is None:
            est = MLPClassifier(hidden_layer_sizes=spec.hidden, activation="relu")
        elif not isinstance(est, MLPClassifier):
            raise ValueError(f"an mlp spec cannot be written into {_estimator_name(est)}")
        _write_mlp(est, spec, params)
    return est
