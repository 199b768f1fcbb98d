"""Tests of the numpy model zoo: dense math, local training, estimators."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits

from fedmqtt.errors import FedMQTTError
from fedmqtt.models import (
    LinearRegression,
    MLPClassifier,
    ModelSpec,
    NotFittedError,
    SoftmaxRegression,
    TrainConfig,
    build_model,
    forward,
    init_params,
    loss_and_grad,
    train_local,
)
from fedmqtt.params import Params

DIGITS_SCALE = (1.0 / 16.0,) * 64


def _digits_split(
    seed: int,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    """Shuffled 80/20 split of scikit-learn's digits (raw pixel values 0..16)."""
    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(X))
    X, y = X[perm], y[perm]
    n_train = int(0.8 * len(X))
    return X[:n_train], y[:n_train], X[n_train:], y[n_train:]


@pytest.fixture(scope="module")
def digits() -> tuple[npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any], npt.NDArray[Any]]:
    return _digits_split(42)


# Several fixed splits, so that the accuracy bar is not met thanks to one lucky split.
SPLIT_SEEDS = [0, 1, 2, 42]


def _dist(a: Params, b: Params) -> float:
    return float(np.sqrt(sum(np.sum((a[k] - b[k]).astype(np.float64) ** 2) for k in a)))


# ---- accuracy on digits ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", SPLIT_SEEDS)
def test_softmax_digits_accuracy(seed: int) -> None:
    Xtr, ytr, Xte, yte = _digits_split(seed)
    spec = ModelSpec("softmax", 64, 10, feature_scale=DIGITS_SCALE)
    model = SoftmaxRegression(spec).fit(Xtr, ytr)  # default hyperparameters
    acc = model.score(Xte, yte)
    print(f"softmax digits split {seed}: test accuracy {acc:.4f}")
    assert acc >= 0.95


@pytest.mark.parametrize("seed", SPLIT_SEEDS)
def test_mlp_digits_accuracy(seed: int) -> None:
    Xtr, ytr, Xte, yte = _digits_split(seed)
    spec = ModelSpec("mlp", 64, 10, hidden=(32,), feature_scale=DIGITS_SCALE)
    model = MLPClassifier(spec).fit(Xtr, ytr)  # default hyperparameters
    acc = model.score(Xte, yte)
    print(f"mlp digits split {seed}: test accuracy {acc:.4f}")
    assert acc >= 0.95


def test_spec_inferred_from_data(digits: Any) -> None:
    Xtr, ytr, Xte, _ = digits
    model = MLPClassifier(hidden=(16, 8), epochs=5).fit(Xtr / 16.0, ytr)
    assert model.spec == ModelSpec("mlp", 64, 10, hidden=(16, 8), classes=tuple(range(10)))
    np.testing.assert_array_equal(model.classes_, np.arange(10))
    proba = model.predict_proba(Xte / 16.0)
    assert proba.dtype == np.float32 and proba.shape == (len(Xte), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(model.predict(Xte / 16.0), np.argmax(proba, axis=1))


def test_non_contiguous_labels() -> None:
    rng = np.random.default_rng(0)
    centers = np.array([[3.0, 0.0], [-3.0, 0.0], [0.0, 3.0]])
    labels = np.array([7, -2, 40])
    idx = rng.integers(0, 3, size=300)
    X = centers[idx] + 0.3 * rng.standard_normal((300, 2))
    y = labels[idx]
    model = SoftmaxRegression(epochs=10).fit(X, y)
    np.testing.assert_array_equal(model.classes_, np.array([-2, 7, 40]))
    assert model.score(X, y) > 0.99
    with pytest.raises(ValueError, match="not among"):
        model.partial_fit(X[:3], np.array([7, 7, 5]))


def test_linear_regression_recovers_weights() -> None:
    rng = np.random.default_rng(1)
    w_true = np.array([1.5, -2.0, 0.5, 3.0, 0.0])
    X = rng.standard_normal((1000, 5))
    y = X @ w_true + 0.7 + 0.01 * rng.standard_normal(1000)
    model = LinearRegression(epochs=30).fit(X, y)
    assert model.score(X, y) > 0.99
    w = model.get_weights()
    np.testing.assert_allclose(w["W0"][:, 0], w_true, atol=0.02)
    np.testing.assert_allclose(w["b0"], [0.7], atol=0.02)
    assert model.predict(X).shape == (1000,)


def test_linear_regression_multi_output_and_preprocessing() -> None:
    rng = np.random.default_rng(2)
    W = rng.standard_normal((3, 2))
    raw = 100.0 + 20.0 * rng.standard_normal((800, 3))  # unscaled sensor-like values
    Y = ((raw - 100.0) / 20.0) @ W + np.array([1.0, -1.0])
    spec = ModelSpec("linear", 3, 2, feature_offset=(100.0,) * 3, feature_scale=(0.05,) * 3)
    model = LinearRegression(spec, epochs=30).fit(raw, Y)
    assert model.predict(raw).shape == (800, 2)
    assert model.score(raw, Y) > 0.999
    np.testing.assert_allclose(model.get_weights()["W0"], W, atol=0.01)


def test_r2_score_matches_definition() -> None:
    spec = ModelSpec("linear", 1, 1)
    model = build_model(spec, {"W0": np.array([[2.0]], np.float32), "b0": np.zeros(1, np.float32)})
    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([0.0, 2.5, 4.0, 5.0])
    pred = 2.0 * X[:, 0]
    expected = 1 - np.sum((y - pred) ** 2) / np.sum((y - y.mean()) ** 2)
    assert model.score(X, y) == pytest.approx(expected)
    assert model.score(X[:1], y[:1]) == 1.0  # constant target predicted exactly
    assert model.score(X[1:2], y[1:2]) == 0.0  # constant target missed


# ---- dense math --------------------------------------------------------------------------


GRAD_SPECS = [
    ModelSpec(
        "softmax", 5, 3, classes=(4, 1, 9), feature_offset=(0.5,) * 5, feature_scale=(2.0,) * 5
    ),
    ModelSpec("linear", 4, 2, feature_scale=(0.5, 1.0, 2.0, 1.5)),
    ModelSpec("linear", 4, 1),
    ModelSpec("mlp", 5, 3, hidden=(7,)),
    ModelSpec("mlp", 5, 4, hidden=(6, 5), feature_offset=(1.0, 0.0, -1.0, 2.0, 0.5)),
    # y is ignored: the autoencoder's target is its preprocessed input.
    ModelSpec("autoencoder", 4, 4, hidden=(3, 2, 3), feature_offset=(0.5, 0, -1, 2)),
]


def _random_problem(
    spec: ModelSpec, rng: np.random.Generator, n: int = 13
) -> tuple[Params, npt.NDArray[Any], npt.NDArray[Any]]:
    params = {
        k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in spec.param_shapes().items()
    }
    X = rng.standard_normal((n, spec.n_features))
    if spec.is_classifier:
        y = rng.choice(np.asarray(spec.labels), size=n)
    elif spec.n_outputs == 1:
        y = rng.standard_normal(n)
    else:
        y = rng.standard_normal((n, spec.n_outputs))
    return params, X, y


@pytest.mark.parametrize("spec", GRAD_SPECS, ids=lambda s: f"{s.kind}-{s.n_outputs}")
def test_gradient_matches_finite_differences(spec: ModelSpec) -> None:
    rng = np.random.default_rng(3)
    params, X, y = _random_problem(spec, rng)
    p64: Any = {k: v.astype(np.float64) for k, v in params.items()}
    _, g64 = loss_and_grad(spec, p64, X, y)
    eps = 1e-6
    for name, value in p64.items():
        numeric = np.zeros_like(value)
        for idx in np.ndindex(value.shape):
            orig = value[idx]
            value[idx] = orig + eps
            up, _ = loss_and_grad(spec, p64, X, y)
            value[idx] = orig - eps
            down, _ = loss_and_grad(spec, p64, X, y)
            value[idx] = orig
            numeric[idx] = (up - down) / (2 * eps)
        np.testing.assert_allclose(g64[name], numeric, rtol=1e-5, atol=1e-8, err_msg=name)
    # The float32 path computes the same gradient, in float32.
    loss32, g32 = loss_and_grad(spec, params, X, y)
    loss64, _ = loss_and_grad(spec, p64, X, y)
    assert loss32 == pytest.approx(loss64, rel=1e-5)
    for name in params:
        assert g32[name].dtype == np.float32
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-6)


def test_loss_values_match_definitions() -> None:
    rng = np.random.default_rng(4)
    spec = ModelSpec("softmax", 3, 3, classes=(5, 6, 7))
    params, X, y = _random_problem(spec, rng, n=20)
    logits = X @ params["W0"].astype(np.float64) + params["b0"]
    logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected = -np.mean(logp[np.arange(20), y - 5])
    assert loss_and_grad(spec, params, X, y)[0] == pytest.approx(expected, rel=1e-5)

    lspec = ModelSpec("linear", 3, 1)
    lparams, X, y = _random_problem(lspec, rng, n=20)
    pred = X @ lparams["W0"].astype(np.float64)[:, 0] + lparams["b0"][0]
    assert loss_and_grad(lspec, lparams, X, y)[0] == pytest.approx(
        0.5 * np.mean((pred - y) ** 2), rel=1e-5
    )


def test_forward_is_stable_for_huge_logits() -> None:
    spec = ModelSpec("softmax", 2, 3)
    params = {
        "W0": np.array([[1e4, -1e4, 0.0], [0.0, 1e4, 3e4]], np.float32),
        "b0": np.zeros(3, np.float32),
    }
    X = np.array([[100.0, 0.0], [0.0, 100.0], [-50.0, 50.0]])
    proba = forward(spec, params, X)
    assert np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.argmax(proba, axis=1), [0, 2, 2])
    loss, grads = loss_and_grad(spec, params, X, np.array([1, 0, 2]))
    assert np.isfinite(loss) and loss > 1e5
    assert all(np.all(np.isfinite(g)) for g in grads.values())


def test_preprocessing_is_part_of_forward() -> None:
    rng = np.random.default_rng(5)
    offset = tuple(rng.standard_normal(4).tolist())
    scale = tuple(rng.uniform(0.5, 2.0, 4).tolist())
    spec = ModelSpec("mlp", 4, 3, hidden=(5,), feature_offset=offset, feature_scale=scale)
    plain = ModelSpec("mlp", 4, 3, hidden=(5,))
    params = init_params(spec, rng)
    X = rng.standard_normal((10, 4)) * 10
    Xp = (X - np.asarray(offset)) * np.asarray(scale)
    np.testing.assert_allclose(forward(spec, params, X), forward(plain, params, Xp), rtol=1e-5)
    X32 = X.astype(np.float32)
    forward(spec, params, X32)
    np.testing.assert_array_equal(X32, X.astype(np.float32))  # input not modified


def test_init_params_shapes_and_scale() -> None:
    rng = np.random.default_rng(6)
    spec = ModelSpec("mlp", 400, 10, hidden=(300, 100))
    params = init_params(spec, rng)
    assert list(params) == ["W0", "b0", "W1", "b1", "W2", "b2"]
    for name, shape in spec.param_shapes().items():
        assert params[name].shape == shape and params[name].dtype == np.float32
    assert np.std(params["W0"]) == pytest.approx(np.sqrt(2 / 400), rel=0.05)
    assert np.std(params["W2"]) == pytest.approx(np.sqrt(2 / 110), rel=0.1)
    assert not np.any(params["b0"])
    soft = init_params(ModelSpec("softmax", 4, 3), rng)
    assert not np.any(soft["W0"]) and not np.any(soft["b0"])


def test_bad_inputs_raise_value_error() -> None:
    spec = ModelSpec("softmax", 3, 2)
    params = init_params(spec, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        forward(spec, params, np.zeros((4, 2)))
    with pytest.raises(ValueError, match="not among"):
        loss_and_grad(spec, params, np.zeros((2, 3)), np.array([0, 2]))
    with pytest.raises(ValueError, match="integers"):
        loss_and_grad(spec, params, np.zeros((2, 3)), np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="samples"):
        loss_and_grad(spec, params, np.zeros((2, 3)), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="W0"):
        forward(spec, {"W0": np.zeros((2, 2), np.float32), "b0": params["b0"]}, np.zeros((1, 3)))


# ---- local training ----------------------------------------------------------------------


def test_train_local_basics(digits: Any) -> None:
    Xtr, ytr, _, _ = digits
    spec = ModelSpec("softmax", 64, 10, feature_scale=DIGITS_SCALE)
    start = init_params(spec, np.random.default_rng(0))
    start["W0"] += 0.01
    before = {k: v.copy() for k, v in start.items()}
    config = TrainConfig(epochs=3, batch_size=32)
    new, stats = train_local(spec, start, Xtr[:100], ytr[:100], config, np.random.default_rng(1))
    for k in start:
        np.testing.assert_array_equal(start[k], before[k])  # input untouched
        assert new[k].dtype == np.float32
    assert stats.num_samples == 100
    assert stats.steps == 3 * 4
    first_loss, _ = loss_and_grad(spec, start, Xtr[:100], ytr[:100])
    assert stats.loss < first_loss
    again, _ = train_local(spec, start, Xtr[:100], ytr[:100], config, np.random.default_rng(1))
    for k in new:
        np.testing.assert_array_equal(new[k], again[k])  # deterministic given the rng
    other, _ = train_local(spec, start, Xtr[:100], ytr[:100], config, np.random.default_rng(2))
    assert not np.array_equal(other["W0"], new["W0"])  # the rng drives the shuffling


def test_fedprox_keeps_params_near_anchor(digits: Any) -> None:
    Xtr, ytr, _, _ = digits
    spec = ModelSpec("mlp", 64, 10, hidden=(16,), feature_scale=DIGITS_SCALE)
    start = init_params(spec, np.random.default_rng(0))
    shard = (Xtr[:150], ytr[:150])

    def moved(mu: float) -> float:
        cfg = TrainConfig(epochs=5, mu=mu)
        new, _ = train_local(spec, start, *shard, cfg, np.random.default_rng(7))
        return _dist(new, start)

    free, prox = moved(0.0), moved(5.0)
    assert prox < 0.5 * free


def test_fedprox_pulls_towards_explicit_anchor() -> None:
    spec = ModelSpec("linear", 3, 1)
    rng = np.random.default_rng(8)
    X = rng.standard_normal((64, 3))
    y = X @ np.array([1.0, 2.0, 3.0])
    start = init_params(spec, rng)
    anchor = {"W0": np.full((3, 1), -5.0, np.float32), "b0": np.full(1, 4.0, np.float32)}
    cfg = TrainConfig(epochs=20, lr=0.01, mu=100.0)
    new, _ = train_local(spec, start, X, y, cfg, rng, anchor=anchor)
    assert _dist(new, anchor) < 0.2 * _dist(start, anchor)


def test_weight_decay_and_clipping_shrink_steps(digits: Any) -> None:
    Xtr, ytr, _, _ = digits
    spec = ModelSpec("softmax", 64, 10)  # unscaled inputs: large gradients
    start = init_params(spec, np.random.default_rng(0))
    base = TrainConfig(epochs=2, lr=0.01)
    plain, _ = train_local(spec, start, Xtr[:200], ytr[:200], base, np.random.default_rng(0))
    clipped_cfg = TrainConfig(epochs=2, lr=0.01, max_grad_norm=0.1)
    clipped, _ = train_local(
        spec, start, Xtr[:200], ytr[:200], clipped_cfg, np.random.default_rng(0)
    )
    decayed_cfg = TrainConfig(epochs=2, lr=0.01, weight_decay=5.0)
    decayed, _ = train_local(
        spec, start, Xtr[:200], ytr[:200], decayed_cfg, np.random.default_rng(0)
    )
    assert _dist(clipped, start) < 0.5 * _dist(plain, start)
    assert _dist(decayed, start) < _dist(plain, start)


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_train_local_raises_on_divergence(digits: Any, kind: str) -> None:
    Xtr, ytr, _, _ = digits
    X = Xtr[:200] * 100.0  # unscaled, large features
    if kind == "linear":
        spec = ModelSpec("linear", 64, 1)
        y = ytr[:200].astype(float)
    else:
        spec = ModelSpec("mlp", 64, 10, hidden=(32, 32))
        y = ytr[:200]
    start = init_params(spec, np.random.default_rng(0))
    sane = TrainConfig(epochs=2, lr=1e-9)
    _, stats = train_local(spec, start, X, y, sane, np.random.default_rng(0))
    assert np.isfinite(stats.loss)
    with pytest.raises(FedMQTTError, match="diverged"):
        train_local(spec, start, X, y, TrainConfig(epochs=5, lr=100.0), np.random.default_rng(0))


def test_train_local_rejects_bad_input() -> None:
    spec = ModelSpec("softmax", 2, 2)
    start = init_params(spec, np.random.default_rng(0))
    cfg = TrainConfig()
    with pytest.raises(ValueError, match="empty"):
        train_local(spec, start, np.zeros((0, 2)), np.zeros(0, int), cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="samples"):
        train_local(spec, start, np.zeros((3, 2)), np.zeros(2, int), cfg, np.random.default_rng(0))
    with pytest.raises(ValueError, match="X contains NaN"):
        train_local(
            spec,
            start,
            np.array([[0.0, np.nan], [1.0, 1.0]]),
            np.zeros(2, int),
            cfg,
            np.random.default_rng(0),
        )
    bad = {"W0": np.full((2, 2), np.nan, np.float32), "b0": start["b0"]}
    with pytest.raises(ValueError, match="NaN"):
        train_local(spec, bad, np.zeros((3, 2)), np.zeros(3, int), cfg, np.random.default_rng(0))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epochs": 0},
        {"lr": 0.0},
        {"lr": float("nan")},
        {"batch_size": 0},
        {"momentum": 1.0},
        {"mu": -1.0},
        {"weight_decay": float("inf")},
        {"max_grad_norm": 0.0},
    ],
)
def test_train_config_validation(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        TrainConfig(**kwargs)


def test_one_epoch_on_a_digits_shard_is_fast(digits: Any) -> None:
    Xtr, ytr, _, _ = digits
    spec = ModelSpec("softmax", 64, 10, feature_scale=DIGITS_SCALE)
    params = init_params(spec, np.random.default_rng(0))
    X, y = Xtr[:90], ytr[:90]
    rng = np.random.default_rng(0)
    cfg = TrainConfig(epochs=1)
    train_local(spec, params, X, y, cfg, rng)  # warm-up
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        train_local(spec, params, X, y, cfg, rng)
        times.append(time.perf_counter() - t0)
    median_ms = 1e3 * float(np.median(times))
    print(f"one softmax epoch on 90x64: {median_ms:.3f} ms")
    assert median_ms < 10.0


# ---- estimator API -----------------------------------------------------------------------


def test_weights_round_trip_and_validation() -> None:
    spec = ModelSpec("mlp", 4, 3, hidden=(5,))
    model = MLPClassifier(spec)
    with pytest.raises(NotFittedError):
        model.get_weights()
    params = init_params(spec, np.random.default_rng(0))
    model.set_weights(params)
    got = model.get_weights()
    assert list(got) == list(spec.param_shapes())
    for k in params:
        np.testing.assert_array_equal(got[k], params[k])
    got["W0"][:] = 99.0  # a copy: the model is unaffected
    params["W1"][:] = 42.0  # set_weights copied too
    assert not np.any(model.get_weights()["W0"] == 99.0)
    assert not np.any(model.get_weights()["W1"] == 42.0)

    good = model.get_weights()
    wrong_shape = {**good, "W0": np.zeros((5, 4), np.float32)}
    with pytest.raises(ValueError, match="shape"):
        model.set_weights(wrong_shape)
    with pytest.raises(ValueError, match="missing"):
        model.set_weights({k: v for k, v in good.items() if k != "b1"})
    with pytest.raises(ValueError, match="unexpected"):
        model.set_weights({**good, "W2": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match="NaN"):
        model.set_weights({**good, "b0": np.full(5, np.nan, np.float32)})
    with pytest.raises(ValueError, match="spec"):
        SoftmaxRegression().set_weights(good)
    # Reordered names are accepted and stored in spec order, as float32.
    model.set_weights({k: good[k].astype(np.float64) for k in reversed(list(good))})
    assert list(model.get_weights()) == list(good)
    assert all(v.dtype == np.float32 for v in model.get_weights().values())


def test_partial_fit(digits: Any) -> None:
    Xtr, ytr, Xte, yte = digits
    with pytest.raises(ValueError, match="classes"):
        SoftmaxRegression().partial_fit(Xtr[:10] / 16, ytr[:10])
    model = SoftmaxRegression(lr=0.05)
    for _ in range(3):  # three passes over the data, 90 samples per call
        for start in range(0, len(Xtr), 90):
            model.partial_fit(
                Xtr[start : start + 90] / 16, ytr[start : start + 90], classes=np.arange(10)
            )
    assert model.score(Xte / 16, yte) > 0.9
    with pytest.raises(ValueError, match="differ"):
        model.partial_fit(Xtr[:10] / 16, ytr[:10], classes=np.arange(11))


def test_build_model_and_warm_start(digits: Any) -> None:
    Xtr, ytr, Xte, _ = digits
    spec = ModelSpec("mlp", 64, 10, hidden=(24,), feature_scale=DIGITS_SCALE)
    trained = MLPClassifier(spec, epochs=10).fit(Xtr, ytr)
    params = trained.get_weights()
    model = build_model(spec, params, lr=1e-6, epochs=1)
    assert isinstance(model, MLPClassifier) and model.hidden == (24,)
    np.testing.assert_array_equal(model.predict_proba(Xte), forward(spec, params, Xte))
    model.fit(Xtr, ytr)  # warm start: continues from params, barely moves with tiny lr
    assert _dist(model.get_weights(), params) < 1e-3
    fresh = build_model(spec, params, lr=1e-6, epochs=1, warm_start=False).fit(Xtr, ytr)
    assert _dist(fresh.get_weights(), params) > 1.0

    assert isinstance(build_model(ModelSpec("softmax", 3, 2)), SoftmaxRegression)
    assert isinstance(build_model(ModelSpec("linear", 3, 2)), LinearRegression)
    with pytest.raises(ValueError, match="hidden"):
        build_model(spec, hidden=(8,))
    with pytest.raises(ValueError, match="spec"):
        SoftmaxRegression(ModelSpec("linear", 3, 1))


def test_hyperparameters_follow_sklearn_conventions() -> None:
    model = MLPClassifier(hidden=(8,), lr=0.1, seed=3)
    params = model.get_params()
    assert params["hidden"] == (8,) and params["lr"] == 0.1 and params["seed"] == 3
    assert "W0" not in params
    copy = clone(model)
    assert isinstance(copy, MLPClassifier) and copy.get_params() == params
    model.set_params(lr=0.2)
    assert model.lr == 0.2
    with pytest.raises(ValueError, match="invalid"):
        model.set_params(learning_rate=0.2)
    assert "lr=0.2" in repr(model)


def test_fit_is_reproducible(digits: Any) -> None:
    Xtr, ytr, _, _ = digits
    a = MLPClassifier(hidden=(8,), epochs=2, seed=5).fit(Xtr[:200] / 16, ytr[:200])
    b = MLPClassifier(hidden=(8,), epochs=2, seed=5).fit(Xtr[:200] / 16, ytr[:200])
    c = MLPClassifier(hidden=(8,), epochs=2, seed=6).fit(Xtr[:200] / 16, ytr[:200])
    wa, wb, wc = a.get_weights(), b.get_weights(), c.get_weights()
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert not all(np.array_equal(wa[k], wc[k]) for k in wa)


def test_import_does_not_pull_in_sklearn() -> None:
    code = (
        "import sys\n"
        "import fedmqtt.models\n"
        "import fedmqtt.models.sklearn_adapters\n"
        "bad = sorted(m for m in sys.modules if m == 'sklearn' or m.startswith('sklearn.'))\n"
        "assert not bad, bad\n"
        "assert fedmqtt.models.SoftmaxRegression\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
