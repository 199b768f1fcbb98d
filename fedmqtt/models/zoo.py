"""Estimators with the scikit-learn API (fit/predict/score), built on :mod:`fedmqtt.models.dense`.

Devices cannot afford scikit-learn, but people building federations know its API, and the
simulator compares against it. These classes follow its conventions (hyperparameters in
``__init__``, ``get_params``/``set_params`` for hyperparameters, fitted state in attributes
ending in ``_``) without importing it. Model tensors are exchanged with ``get_weights`` and
``set_weights`` -- never ``get_params``, which in scikit-learn means hyperparameters.

``fit`` starts from a fresh initialisation unless ``warm_start`` is set, as in scikit-learn;
:func:`build_model` given weights sets ``warm_start=True`` so that fitting a model built from
the global weights continues from them (and FedProx anchors to them).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar, Self, cast

import numpy as np
import numpy.typing as npt

from fedmqtt.models.dense import (
    check_params,
    encode_targets,
    forward,
    init_params,
)
from fedmqtt.models.spec import Kind, ModelSpec
from fedmqtt.models.train import TrainConfig, TrainStats, train_local
from fedmqtt.params import F32, Params, all_finite, copy_params

__all__ = [
    "LinearRegression",
    "MLPClassifier",
    "NotFittedError",
    "SoftmaxRegression",
    "build_model",
]


class NotFittedError(ValueError, AttributeError):
    """The model has no weights yet (same bases as scikit-learn's exception of that name)."""


class _DenseEstimator:
    """Shared machinery: hyperparameters, weights, training through :func:`train_local`."""

    _kind: ClassVar[Kind]

    spec: ModelSpec | None

    def __init__(
        self,
        spec: ModelSpec | None = None,
        *,
        lr: float = 0.05,
        epochs: int = 20,
        batch_size: int = 32,
        momentum: float = 0.9,
        mu: float = 0.0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        warm_start: bool = False,
        seed: int = 0,
    ) -> None:
        if spec is not None and spec.kind != self._kind:
            raise ValueError(
                f"{type(self).__name__} needs a {self._kind!r} spec, not {spec.kind!r}"
            )
        self.spec = spec
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.momentum = momentum
        self.mu = mu
        self.weight_decay = weight_decay
        self.max_grad_norm = max_grad_norm
        self.warm_start = warm_start
        self.seed = seed
        self._weights: Params | None = None
        self._rng: np.random.Generator | None = None
        self.train_stats_: TrainStats | None = None

    # ---- hyperparameters (scikit-learn convention) -------------------------------------
    @classmethod
    def _param_names(cls) -> list[str]:
        sig = inspect.signature(cls.__init__)
        return [p for p in sig.parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """Hyperparameters (constructor arguments), as in scikit-learn. Not the weights."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Self:
        valid = set(self._param_names())
        for name, value in params.items():
            if name not in valid:
                raise ValueError(f"invalid hyperparameter {name!r} for {type(self).__name__}")
            if name == "spec" and value is not None and value.kind != self._kind:
                raise ValueError(f"{type(self).__name__} needs a {self._kind!r} spec")
            setattr(self, name, value)
        return self

    def __repr__(self) -> str:
        sig = inspect.signature(type(self).__init__)
        changed = [
            f"{name}={getattr(self, name)!r}"
            for name, p in sig.parameters.items()
            if name != "self" and getattr(self, name) != p.default
        ]
        return f"{type(self).__name__}({', '.join(changed)})"

    # ---- weights -------------------------------------------------------------------------
    def get_weights(self) -> Params:
        """Copies of the model tensors, in spec order."""
        return copy_params(self._require_weights())

    def set_weights(self, params: Mapping[str, npt.ArrayLike]) -> None:
        """Replace the model tensors; names and shapes must match ``spec.param_shapes()``."""
        if self.spec is None:
            raise ValueError("set a spec (constructor or fit) before setting weights")
        arrays = {k: np.asarray(v) for k, v in params.items()}
        check_params(self.spec, arrays)
        for name, a in arrays.items():
            if a.dtype.kind not in "biuf":
                raise ValueError(f"parameter {name!r} is not numeric (dtype {a.dtype})")
        weights: Params = {
            name: np.array(arrays[name], dtype=np.float32) for name in self.spec.param_shapes()
        }
        if not all_finite(weights):
            raise ValueError("weights contain NaN or Inf")
        self._weights = weights

    def _require_weights(self) -> Params:
        if self._weights is None:
            raise NotFittedError(
                f"this {type(self).__name__} has no weights yet: call fit, partial_fit or "
                "set_weights first"
            )
        return self._weights

    def _require_spec(self) -> ModelSpec:
        if self.spec is None:
            raise NotFittedError(f"this {type(self).__name__} has no spec yet: call fit first")
        return self.spec

    # ---- training ------------------------------------------------------------------------
    def _spec_from_data(self, X: npt.NDArray[Any], y: npt.NDArray[Any]) -> ModelSpec:
        raise NotImplementedError  # pragma: no cover - every concrete class overrides it

    def _config(self, epochs: int) -> TrainConfig:
        return TrainConfig(
            epochs=epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            momentum=self.momentum,
            mu=self.mu,
            weight_decay=self.weight_decay,
            max_grad_norm=self.max_grad_norm,
        )

    def _generator(self) -> np.random.Generator:
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def _train(self, X: npt.NDArray[Any], y: npt.NDArray[Any], epochs: int) -> None:
        spec = self._require_spec()
        params, stats = train_local(
            spec, self._require_weights(), X, y, self._config(epochs), self._generator()
        )
        self._weights = params
        self.train_stats_ = stats

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> Self:
        """Train for ``epochs`` epochs (from scratch unless ``warm_start`` and weights exist)."""
        Xa, ya = np.asarray(X), np.asarray(y)
        if self.spec is None:
            self.spec = self._spec_from_data(Xa, ya)
        if not (self.warm_start and self._weights is not None):
            self._rng = np.random.default_rng(self.seed)
            self._weights = init_params(self.spec, self._rng)
        self._train(Xa, ya, self.epochs)
        return self

    def partial_fit(
        self, X: npt.ArrayLike, y: npt.ArrayLike, classes: npt.ArrayLike | None = None
    ) -> Self:
        """One epoch over ``(X, y)``, continuing from the current weights."""
        Xa, ya = np.asarray(X), np.asarray(y)
        if self.spec is None:
            self.spec = self._spec_for_partial_fit(Xa, ya, classes)
        elif classes is not None:
            self._check_classes(classes)
        if self._weights is None:
            self._weights = init_params(self.spec, self._generator())
        self._train(Xa, ya, 1)
        return self

    def _spec_for_partial_fit(
        self, X: npt.NDArray[Any], y: npt.NDArray[Any], classes: npt.ArrayLike | None
    ) -> ModelSpec:
        return self._spec_from_data(X, y)

    def _check_classes(self, classes: npt.ArrayLike) -> None:
        """Regressors ignore ``classes``; classifiers check it against the spec."""

    def _raw_forward(self, X: npt.ArrayLike) -> F32:
        return forward(self._require_spec(), self._require_weights(), X)


def _int_labels(y: npt.NDArray[Any]) -> tuple[int, ...]:
    """Sorted distinct integer labels of ``y`` (the spec can only carry integer classes)."""
    if y.ndim != 1:
        raise ValueError(f"classifier targets must be 1-D labels, got shape {y.shape}")
    uniq = np.unique(y)
    if uniq.dtype.kind == "f" and np.all(np.isfinite(uniq)) and np.all(uniq == np.floor(uniq)):
        uniq = uniq.astype(np.int64)
    if uniq.dtype.kind not in "biu":
        raise ValueError(
            f"classifier labels must be integers (got dtype {uniq.dtype}); encode them first"
        )
    return tuple(int(c) for c in uniq)


class _Classifier(_DenseEstimator):
    """Classification behaviour shared by softmax regression and the MLP."""

    def _classifier_spec(self, n_features: int, classes: tuple[int, ...]) -> ModelSpec:
        raise NotImplementedError  # pragma: no cover - every concrete class overrides it

    def _spec_from_data(self, X: npt.NDArray[Any], y: npt.NDArray[Any]) -> ModelSpec:
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
        classes = _int_labels(y)
        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes in y, got {list(classes)}")
        return self._classifier_spec(X.shape[1], classes)

    def _spec_for_partial_fit(
        self, X: npt.NDArray[Any], y: npt.NDArray[Any], classes: npt.ArrayLike | None
    ) -> ModelSpec:
        # Inferring classes from the first batch silently breaks on the next batch that has a
        # class the first one lacked, hence scikit-learn's rule that the first call lists them.
        if classes is None:
            raise ValueError("the first partial_fit call needs classes= (or give a spec)")
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
        labels = _int_labels(np.asarray(classes))
        if len(labels) < 2:
            raise ValueError("a classifier needs at least 2 classes")
        return self._classifier_spec(X.shape[1], labels)

    def _check_classes(self, classes: npt.ArrayLike) -> None:
        spec = self._require_spec()
        if set(_int_labels(np.asarray(classes))) != set(spec.labels):
            raise ValueError(
                f"classes {np.asarray(classes).tolist()} differ from the model's {spec.labels}"
            )

    @property
    def classes_(self) -> npt.NDArray[np.int64]:
        """Labels in output order, like scikit-learn's ``classes_``."""
        return np.asarray(self._require_spec().labels, dtype=np.int64)

    def predict_proba(self, X: npt.ArrayLike) -> F32:
        """Class probabilities, columns in ``classes_`` order."""
        return self._raw_forward(X)

    def predict(self, X: npt.ArrayLike) -> npt.NDArray[np.int64]:
        proba = self.predict_proba(X)
        return cast(npt.NDArray[np.int64], self.classes_[np.argmax(proba, axis=1)])

    def score(self, X: npt.ArrayLike, y: npt.ArrayLike) -> float:
        """Accuracy."""
        ya = np.asarray(y)
        pred = self.predict(X)
        if ya.shape != pred.shape:
            raise ValueError(f"y has shape {ya.shape}, expected {pred.shape}")
        if ya.size == 0:
            raise ValueError("cannot score on zero samples")
        return float(np.mean(pred == ya))


class SoftmaxRegression(_Classifier):
    """Multinomial logistic regression (``kind="softmax"``)."""

    _kind = "softmax"

    def _classifier_spec(self, n_features: int, classes: tuple[int, ...]) -> ModelSpec:
        return ModelSpec("softmax", n_features, len(classes), classes=classes)


class MLPClassifier(_Classifier):
    """ReLU network with 1 or 2 hidden layers and a softmax output (``kind="mlp"``).

    ``hidden`` is used only when the spec is derived from data; a given spec's architecture
    wins (:func:`build_model` passes ``hidden=spec.hidden`` so the two agree).
    """

    _kind = "mlp"

    def __init__(
        self,
        spec: ModelSpec | None = None,
        *,
        hidden: tuple[int, ...] = (32,),
        lr: float = 0.05,
        epochs: int = 30,
        batch_size: int = 32,
        momentum: float = 0.9,
        mu: float = 0.0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        warm_start: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            spec,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            momentum=momentum,
            mu=mu,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            warm_start=warm_start,
            seed=seed,
        )
        self.hidden = hidden

    def _classifier_spec(self, n_features: int, classes: tuple[int, ...]) -> ModelSpec:
        return ModelSpec(
            "mlp", n_features, len(classes), hidden=tuple(self.hidden), classes=classes
        )


class LinearRegression(_DenseEstimator):
    """Least-squares linear regression trained by SGD (``kind="linear"``).

    Unlike scikit-learn's closed-form estimator of the same name this one learns by SGD, so
    that devices can train it incrementally and federate it like the others; features should
    be scaled (spec preprocessing) for the default learning rate to be stable.
    """

    _kind = "linear"

    def __init__(
        self,
        spec: ModelSpec | None = None,
        *,
        lr: float = 0.01,
        epochs: int = 20,
        batch_size: int = 32,
        momentum: float = 0.9,
        mu: float = 0.0,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        warm_start: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(
            spec,
            lr=lr,
            epochs=epochs,
            batch_size=batch_size,
            momentum=momentum,
            mu=mu,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            warm_start=warm_start,
            seed=seed,
        )

    def _spec_from_data(self, X: npt.NDArray[Any], y: npt.NDArray[Any]) -> ModelSpec:
        if X.ndim != 2:
            raise ValueError(f"X must be 2-D, got shape {X.shape}")
        if y.ndim not in (1, 2):
            raise ValueError(f"y must have shape (n,) or (n, k), got {y.shape}")
        n_outputs = 1 if y.ndim == 1 else y.shape[1]
        return ModelSpec("linear", X.shape[1], n_outputs)

    def predict(self, X: npt.ArrayLike) -> F32:
        """Predictions, shape ``(n,)`` for one output, ``(n, n_outputs)`` otherwise."""
        out = self._raw_forward(X)
        return out[:, 0] if out.shape[1] == 1 else out

    def score(self, X: npt.ArrayLike, y: npt.ArrayLike) -> float:
        """Coefficient of determination R^2, averaged uniformly over outputs.

        A constant target scores 1.0 if predicted exactly and 0.0 otherwise (scikit-learn's
        ``force_finite`` convention) instead of dividing by zero.
        """
        spec = self._require_spec()
        target = encode_targets(spec, y, np.float64)
        pred = self._raw_forward(X).astype(np.float64)
        if target.shape != pred.shape:
            raise ValueError(f"y has {target.shape[0]} samples, X has {pred.shape[0]}")
        if target.shape[0] == 0:
            raise ValueError("cannot score on zero samples")
        ss_res = np.sum((target - pred) ** 2, axis=0)
        ss_tot = np.sum((target - target.mean(axis=0)) ** 2, axis=0)
        safe = ss_tot > 0
        r2 = np.where(safe, 1.0 - ss_res / np.where(safe, ss_tot, 1.0), 0.0)
        r2 = np.where(~safe & (ss_res == 0), 1.0, r2)
        return float(np.mean(r2))


Model = SoftmaxRegression | LinearRegression | MLPClassifier

_CLASSES: dict[str, type[SoftmaxRegression] | type[LinearRegression] | type[MLPClassifier]] = {
    "softmax": SoftmaxRegression,
    "linear": LinearRegression,
    "mlp": MLPClassifier,
}


def build_model(spec: ModelSpec, params: Params | None = None, **hyper: Any) -> Model:
    """The estimator for ``spec``, optionally holding ``params``.

    With ``params`` the model is ready to predict and, unless ``warm_start`` is given
    explicitly, fitting it continues from those weights. ``hyper`` are constructor
    hyperparameters (``lr``, ``epochs``, ...); ``hidden`` is taken from the spec.
    """
    cls = _CLASSES[spec.kind]
    if spec.kind == "mlp":
        if "hidden" in hyper and tuple(hyper["hidden"]) != spec.hidden:
            raise ValueError(f"hidden={hyper['hidden']!r} contradicts the spec's {spec.hidden}")
        hyper["hidden"] = spec.hidden
    if params is not None:
        hyper.setdefault("warm_start", True)
    model = cls(spec, **hyper)
    if params is not None:
        model.set_weights(params)
    return model
