"""Conversions between scikit-learn estimators and (ModelSpec, Params)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression, SGDClassifier, SGDRegressor
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.tree import DecisionTreeClassifier

from fedmqtt.models import MLPClassifier, ModelSpec, SoftmaxRegression, forward
from fedmqtt.models.sklearn_adapters import from_sklearn, to_sklearn
from fedmqtt.params import Params

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

Data = tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]


@pytest.fixture(scope="module")
def multiclass() -> Data:
    X, y = load_digits(return_X_y=True)
    return X / 16.0, y


@pytest.fixture(scope="module")
def binary(multiclass: Data) -> Data:
    X, y = multiclass
    return X, (y >= 5).astype(np.int64) * 3 + 2  # labels 2 and 5: not 0/1 on purpose


ESTIMATORS: dict[str, Callable[[], Any]] = {
    "logreg": lambda: LogisticRegression(max_iter=200),
    "sgd-log": lambda: SGDClassifier(loss="log_loss", random_state=0),
    "sgd-hinge": lambda: SGDClassifier(loss="hinge", random_state=0),
    "mlp-1": lambda: SkMLP(hidden_layer_sizes=(16,), max_iter=60, random_state=0),
    "mlp-2": lambda: SkMLP(hidden_layer_sizes=(16, 8), max_iter=60, random_state=0),
}


_FITTED: dict[tuple[str, str], Any] = {}


def _fitted(name: str, task: str, request: Any) -> tuple[Any, Data]:
    """Each estimator is fitted once per task and shared by the tests (they do not mutate it)."""
    data = request.getfixturevalue(task)
    if (name, task) not in _FITTED:
        _FITTED[name, task] = ESTIMATORS[name]().fit(*data)
    return _FITTED[name, task], data


def _same_params(a: Params, b: Params) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == np.float32 and np.array_equal(a[k], b[k]) for k in a
    )


@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_classifier_round_trip_is_exact(name: str, task: str, request: Any) -> None:
    est, (X, _) = _fitted(name, task, request)
    spec, params = from_sklearn(est)
    assert spec.kind == ("mlp" if name.startswith("mlp") else "softmax")
    assert spec.labels == tuple(int(c) for c in est.classes_)
    assert spec.n_features == 64 and spec.n_outputs == len(est.classes_)

    est2 = to_sklearn(spec, params)
    spec2, params2 = from_sklearn(est2)
    assert spec2 == spec
    assert _same_params(params, params2)
    np.testing.assert_array_equal(est2.predict(X), est.predict(X))
    np.testing.assert_array_equal(est2.classes_, est.classes_)

    est3 = to_sklearn(spec2, params2)
    np.testing.assert_array_equal(est3.predict(X), est2.predict(X))
    np.testing.assert_array_equal(est3.predict_proba(X), est2.predict_proba(X))

    # Writing into an estimator of the same type (fresh, unfitted) works too.
    est4 = to_sklearn(spec, params, clone(est))
    assert type(est4) is type(est)
    np.testing.assert_array_equal(est4.predict(X), est.predict(X))
    assert _same_params(from_sklearn(est4)[1], params)


@pytest.mark.parametrize("task", ["binary", "multiclass"])
@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_numpy_forward_matches_sklearn(name: str, task: str, request: Any) -> None:
    est, (X, _) = _fitted(name, task, request)
    spec, params = from_sklearn(est)
    proba = forward(spec, params, X)
    labels = np.asarray(spec.labels)[np.argmax(proba, axis=1)]
    np.testing.assert_array_equal(labels, est.predict(X))
    one_vs_rest = name.startswith("sgd") and task == "multiclass"
    if hasattr(est, "predict_proba") and not one_vs_rest:
        np.testing.assert_allclose(proba, est.predict_proba(X), rtol=1e-5)


def test_binary_uses_a_zero_first_column(binary: Data) -> None:
    X, y = binary
    est = LogisticRegression().fit(X, y)
    _, params = from_sklearn(est)
    assert params["W0"].shape == (64, 2)
    assert not np.any(params["W0"][:, 0]) and params["b0"][0] == 0.0
    np.testing.assert_array_equal(params["W0"][:, 1], est.coef_[0].astype(np.float32))


def test_sgd_regressor_round_trip_and_parity() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((300, 6))
    y = X @ rng.standard_normal(6) + 1.5
    est = SGDRegressor(random_state=0).fit(X, y)
    spec, params = from_sklearn(est)
    assert spec == ModelSpec("linear", 6, 1)
    np.testing.assert_allclose(forward(spec, params, X)[:, 0], est.predict(X), rtol=1e-5, atol=1e-5)
    est2 = to_sklearn(spec, params)
    assert isinstance(est2, SGDRegressor)
    spec2, params2 = from_sklearn(est2)
    assert spec2 == spec and _same_params(params, params2)
    # The float32 cast is the only change: est -> est2 is close, est2 -> est3 is exact.
    np.testing.assert_allclose(est2.predict(X), est.predict(X), rtol=1e-5, atol=1e-5)
    est3 = to_sklearn(spec2, params2, clone(est))
    np.testing.assert_array_equal(est3.predict(X), est2.predict(X))


@pytest.mark.parametrize("n_classes", [2, 10])
@pytest.mark.parametrize("kind", ["softmax", "mlp"])
def test_numpy_trained_model_exports_with_preprocessing(
    multiclass: Data, kind: str, n_classes: int
) -> None:
    X, y = multiclass
    X = X * 16.0  # raw pixels; the spec carries the scaling and an offset
    if n_classes == 2:
        y = (y >= 5).astype(np.int64)
    scale, offset = (1 / 16,) * 64, (8.0,) * 64
    classes = tuple(range(n_classes))
    if kind == "softmax":
        spec = ModelSpec(
            "softmax", 64, n_classes, classes=classes, feature_scale=scale, feature_offset=offset
        )
        model: SoftmaxRegression | MLPClassifier = SoftmaxRegression(spec, epochs=5)
    else:
        spec = ModelSpec(
            "mlp",
            64,
            n_classes,
            hidden=(12, 6),
            classes=classes,
            feature_scale=scale,
            feature_offset=offset,
        )
        model = MLPClassifier(spec, epochs=5)
    model.fit(X, y)
    est = to_sklearn(spec, model.get_weights())
    np.testing.assert_allclose(est.predict_proba(X), model.predict_proba(X), rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(est.predict(X), model.predict(X))
    # Back: preprocessing is folded into the weights, so the spec no longer has it.
    spec_back, params_back = from_sklearn(est)
    assert not spec_back.feature_scale and not spec_back.feature_offset
    np.testing.assert_allclose(
        forward(spec_back, params_back, X), model.predict_proba(X), rtol=1e-4, atol=1e-6
    )


def test_unsupported_estimators_and_configurations(multiclass: Data, binary: Data) -> None:
    X, y = multiclass
    with pytest.raises(ValueError, match="unsupported estimator DecisionTreeClassifier"):
        from_sklearn(DecisionTreeClassifier().fit(X, y))
    with pytest.raises(ValueError, match="activation='tanh'"):
        from_sklearn(SkMLP((8,), activation="tanh", max_iter=5).fit(X, y))
    with pytest.raises(ValueError, match="3 hidden layers"):
        from_sklearn(SkMLP((8, 8, 8), max_iter=5).fit(X, y))
    with pytest.raises(ValueError, match="not fitted"):
        from_sklearn(LogisticRegression())
    with pytest.raises(ValueError, match="integer labels"):
        from_sklearn(LogisticRegression(max_iter=50).fit(X, np.array(["a", "b"])[y % 2]))
    multilabel = np.stack([y % 2, (y > 4).astype(int)], axis=1)
    with pytest.raises(ValueError, match="multilabel"):
        from_sklearn(SkMLP((8,), max_iter=5).fit(X, multilabel))

    spec, params = from_sklearn(LogisticRegression(max_iter=50).fit(*binary))
    with pytest.raises(ValueError, match="cannot be written into SGDRegressor"):
        to_sklearn(spec, params, SGDRegressor())
    with pytest.raises(ValueError, match="activation"):
        to_sklearn(
            *from_sklearn(SkMLP((8,), max_iter=5).fit(X, y)), SkMLP((8,), activation="logistic")
        )
    two_out = ModelSpec("linear", 3, 2)
    zeros = {"W0": np.zeros((3, 2), np.float32), "b0": np.zeros(2, np.float32)}
    with pytest.raises(ValueError, match="one output"):
        to_sklearn(two_out, zeros)
    with pytest.raises(ValueError, match="shape"):
        to_sklearn(
            ModelSpec("linear", 4, 1),
            {"W0": np.zeros((3, 1), np.float32), "b0": np.zeros(1, np.float32)},
        )


def test_integral_float_labels_are_accepted(binary: Data) -> None:
    X, y = binary
    est = LogisticRegression(max_iter=100).fit(X, y.astype(np.float64))
    spec, params = from_sklearn(est)
    assert spec.labels == (2, 5)
    np.testing.assert_array_equal(to_sklearn(spec, params).predict(X), est.predict(X))
