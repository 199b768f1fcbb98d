"""ONNX export: validity, standard operators only, metadata, and numpy/onnxruntime parity.

Parity tolerances (from the issue): probabilities ``rtol=1e-5, atol=1e-6``, labels exactly
equal, regression ``rtol=1e-4``. For regression an absolute floor of ``1e-5 * max|y|`` is
added: both sides are float32 sums whose rounding error scales with the largest terms, so a
prediction that happens to land near zero cannot meet a pure relative tolerance.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest
from sklearn.datasets import load_diabetes, load_digits
from sklearn.linear_model import LogisticRegression, SGDClassifier, SGDRegressor
from sklearn.neural_network import MLPClassifier as SkMLP
from sklearn.tree import DecisionTreeClassifier

from fedmqtt.models import (
    LinearRegression,
    MLPClassifier,
    ModelSpec,
    SoftmaxRegression,
    forward,
    init_params,
)
from fedmqtt.models.sklearn_adapters import from_sklearn
from fedmqtt.onnx_export import (
    IR_VERSION,
    OPSET,
    build_model_proto,
    export_onnx,
    export_sklearn,
    read_metadata,
)
from fedmqtt.params import Params

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

F32 = npt.NDArray[np.float32]
P_RTOL, P_ATOL = 1e-5, 1e-6  # probabilities
STANDARD_OPS = {"Sub", "Mul", "MatMul", "Add", "Relu", "Softmax", "ArgMax", "Gather"}
BATCHES = (1, 1000)


def _perturbed(spec: ModelSpec, seed: int) -> Params:
    """Non-trivial weights (softmax and linear models initialise to zero)."""
    rng = np.random.default_rng(seed)
    params = init_params(spec, rng)
    return {k: (v + rng.normal(0.0, 0.5, v.shape)).astype(np.float32) for k, v in params.items()}


# Every kind of the zoo, with and without preprocessing, default and custom labels.
ZOO_SPECS: dict[str, ModelSpec] = {
    "softmax": ModelSpec("softmax", 6, 3),
    "softmax-binary-labels": ModelSpec("softmax", 6, 2, classes=(7, -1)),
    "softmax-prep-labels": ModelSpec(
        "softmax",
        6,
        4,
        classes=(10, 20, 5, 99),
        feature_offset=(1.0, -2.0, 0.5, 0.0, 3.0, 10.0),
        feature_scale=(0.5, 2.0, 1.0, 0.1, 1.5, 0.01),
        feature_names=("t", "rh", "co2", "lux", "db", "pa"),
    ),
    "linear": ModelSpec("linear", 6, 1),
    "linear-multi-prep": ModelSpec(
        "linear", 6, 3, feature_offset=(1.0,) * 6, feature_scale=(0.25,) * 6
    ),
    "linear-offset-only": ModelSpec("linear", 6, 1, feature_offset=(5.0,) * 6),
    "mlp-1": ModelSpec("mlp", 6, 3, hidden=(16,)),
    "mlp-2": ModelSpec("mlp", 6, 5, hidden=(16, 8)),
    "mlp-2-prep-labels": ModelSpec(
        "mlp",
        6,
        3,
        hidden=(12, 7),
        classes=(3, 1, 2),
        feature_scale=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6),
    ),
}


def _session(model_bytes: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, X: npt.ArrayLike) -> dict[str, Any]:
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, {"features": np.asarray(X, dtype=np.float32)})
    return dict(zip(names, outs, strict=True))


def _check_parity(spec: ModelSpec, params: Params, model_bytes: bytes, X: npt.ArrayLike) -> None:
    """The graph's outputs against :func:`forward` (and ``labels[argmax]``) on ``X``."""
    X32 = np.asarray(X, dtype=np.float32)
    ref = forward(spec, params, X32)
    out = _run(_session(model_bytes), X32)
    if spec.is_classifier:
        assert set(out) == {"label", "probabilities"}
        assert out["probabilities"].dtype == np.float32
        assert out["probabilities"].shape == (X32.shape[0], spec.n_outputs)
        np.testing.assert_allclose(out["probabilities"], ref, rtol=P_RTOL, atol=P_ATOL)
        labels = np.asarray(spec.labels, dtype=np.int64)[np.argmax(ref, axis=1)]
        assert out["label"].dtype == np.int64
        np.testing.assert_array_equal(out["label"], labels)
    else:
        assert set(out) == {"prediction"}
        assert out["prediction"].shape == (X32.shape[0], spec.n_outputs)
        floor = 1e-5 * float(np.abs(ref).max())
        np.testing.assert_allclose(out["prediction"], ref, rtol=1e-4, atol=floor)


def _check_graph(model_bytes: bytes) -> onnx.ModelProto:
    model = onnx.load_from_string(model_bytes)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert model.ir_version == IR_VERSION
    ops = {n.op_type for n in model.graph.node}
    assert ops <= STANDARD_OPS, ops - STANDARD_OPS
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert "ai.onnx.ml" not in model_bytes.decode("latin-1")
    assert [i.name for i in model.graph.input] == ["features"]
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"  # dynamic batch
    return model


def _random_inputs(n_features: int, batch: int, seed: int, scale: float = 3.0) -> F32:
    return (np.random.default_rng(seed).normal(0.0, scale, (batch, n_features))).astype(np.float32)


# --------------------------------------------------------------------------- zoo specs


@pytest.mark.parametrize("name", list(ZOO_SPECS))
def test_zoo_export_is_valid_standard_onnx(name: str) -> None:
    spec = ZOO_SPECS[name]
    model_bytes = export_onnx(spec, _perturbed(spec, 1), federation="f", version=1, created_at=0)
    model = _check_graph(model_bytes)
    outputs = [o.name for o in model.graph.output]
    assert outputs == (["label", "probabilities"] if spec.is_classifier else ["prediction"])
    if spec.kind == "mlp":
        assert sum(n.op_type == "Relu" for n in model.graph.node) == len(spec.hidden)
    prep = {n.op_type for n in model.graph.node} & {"Sub", "Mul"}
    expected = ({"Sub"} if spec.feature_offset else set()) | (
        {"Mul"} if spec.feature_scale else set()
    )
    assert prep == expected


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(ZOO_SPECS))
def test_zoo_parity_on_random_inputs(name: str, batch: int) -> None:
    spec = ZOO_SPECS[name]
    params = _perturbed(spec, 2)
    model_bytes = export_onnx(spec, params, federation="f", version=3, created_at=0)
    _check_parity(spec, params, model_bytes, _random_inputs(spec.n_features, batch, seed=batch))


def test_preprocessing_is_applied_in_the_graph() -> None:
    """A device feeds raw values: dropping the preprocessing must change the outputs."""
    spec = ZOO_SPECS["softmax-prep-labels"]
    params = _perturbed(spec, 3)
    bare = ModelSpec("softmax", 6, 4, classes=spec.classes)
    X = _random_inputs(6, 200, seed=4)
    with_prep = _run(_session(export_onnx(spec, params, federation="", version=0, created_at=0)), X)
    without = _run(_session(export_onnx(bare, params, federation="", version=0, created_at=0)), X)
    assert not np.allclose(with_prep["probabilities"], without["probabilities"], atol=1e-3)
    offset = np.asarray(spec.feature_offset, dtype=np.float32)
    Xp = (X - offset) * np.asarray(spec.feature_scale, dtype=np.float32)
    np.testing.assert_allclose(
        with_prep["probabilities"], forward(bare, params, Xp), rtol=P_RTOL, atol=P_ATOL
    )


def test_labels_are_class_labels_not_indices() -> None:
    spec = ModelSpec("softmax", 2, 3, classes=(40, 10, 30))
    params: Params = {
        "W0": np.zeros((2, 3), dtype=np.float32),
        "b0": np.array([0.0, 5.0, 0.0], dtype=np.float32),  # always output index 1
    }
    out = _run(
        _session(export_onnx(spec, params, federation="", version=0, created_at=0)),
        np.zeros((4, 2)),
    )
    np.testing.assert_array_equal(out["label"], [10, 10, 10, 10])


def test_ties_resolve_to_the_first_class_like_numpy() -> None:
    spec = ModelSpec("softmax", 2, 3, classes=(4, 5, 6))
    params: Params = {"W0": np.zeros((2, 3), np.float32), "b0": np.zeros(3, np.float32)}
    out = _run(
        _session(export_onnx(spec, params, federation="", version=0, created_at=0)), np.ones((3, 2))
    )
    np.testing.assert_array_equal(out["label"], [4, 4, 4])


def test_huge_logits_stay_finite() -> None:
    """ONNX Softmax is the stable one, like the numpy forward pass."""
    spec = ModelSpec("softmax", 1, 2)
    params: Params = {"W0": np.array([[0.0, 1e4]], np.float32), "b0": np.zeros(2, np.float32)}
    model_bytes = export_onnx(spec, params, federation="", version=0, created_at=0)
    X = np.array([[1.0], [-1.0], [0.0]], np.float32)
    out = _run(_session(model_bytes), X)
    assert np.isfinite(out["probabilities"]).all()
    _check_parity(spec, params, model_bytes, X)


# --------------------------------------------------------------------------- metadata


def test_metadata_round_trip() -> None:
    spec = ZOO_SPECS["softmax-prep-labels"]
    params = _perturbed(spec, 5)
    model_bytes = export_onnx(
        spec, params, federation="plant-7", version=42, created_at=1_700_000_000.25
    )
    meta = read_metadata(model_bytes)
    assert meta["fedmqtt.federation"] == "plant-7"
    assert int(meta["fedmqtt.version"]) == 42
    assert meta["fedmqtt.kind"] == "softmax"
    assert int(meta["fedmqtt.n_features"]) == 6
    assert int(meta["fedmqtt.n_outputs"]) == 4
    assert json.loads(meta["fedmqtt.feature_names"]) == list(spec.feature_names)
    assert json.loads(meta["fedmqtt.classes"]) == [10, 20, 5, 99]
    assert float(meta["fedmqtt.created_at"]) == 1_700_000_000.25
    assert meta["fedmqtt.created_at_utc"] == "2023-11-14T22:13:20.250+00:00"
    assert meta["fedmqtt.spec_fingerprint"] == spec.fingerprint()
    model = onnx.load_from_string(model_bytes)
    assert model.model_version == 42
    assert model.producer_name == "fedmqtt"
    # onnxruntime sees the same metadata (the device reads it from there).
    rt_meta = _session(model_bytes).get_modelmeta()
    assert rt_meta.custom_metadata_map == meta
    assert rt_meta.version == 42


def test_regression_metadata_has_no_classes() -> None:
    spec = ZOO_SPECS["linear"]
    meta = read_metadata(
        export_onnx(spec, _perturbed(spec, 0), federation="f", version=0, created_at=0)
    )
    assert json.loads(meta["fedmqtt.classes"]) is None
    assert json.loads(meta["fedmqtt.feature_names"]) == []


def test_export_is_deterministic() -> None:
    spec = ZOO_SPECS["mlp-2"]
    params = _perturbed(spec, 6)
    a = export_onnx(spec, params, federation="f", version=1, created_at=12.5)
    b = export_onnx(
        spec, {k: v.copy() for k, v in params.items()}, federation="f", version=1, created_at=12.5
    )
    assert a == b
    c = export_onnx(spec, params, federation="f", version=2, created_at=12.5)
    assert a != c


def test_read_metadata_rejects_junk() -> None:
    with pytest.raises(ValueError, match="not an ONNX model"):
        read_metadata(b"\xff\xfe definitely not protobuf")
    with pytest.raises(ValueError, match="not an ONNX model"):
        read_metadata(b"")


def test_bad_exports_are_refused() -> None:
    spec = ZOO_SPECS["mlp-1"]
    params = _perturbed(spec, 7)
    with pytest.raises(ValueError, match="shape"):
        export_onnx(
            spec, {**params, "W0": params["W0"][:, :3]}, federation="", version=0, created_at=0
        )
    with pytest.raises(ValueError, match="missing"):
        export_onnx(
            spec,
            {k: v for k, v in params.items() if k != "b1"},
            federation="",
            version=0,
            created_at=0,
        )
    bad = {k: v.copy() for k, v in params.items()}
    bad["W1"][0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        export_onnx(spec, bad, federation="", version=0, created_at=0)
    with pytest.raises(ValueError, match="version"):
        export_onnx(spec, params, federation="", version=-1, created_at=0)
    for when in (float("nan"), 1e300):
        with pytest.raises(ValueError, match="created_at"):
            export_onnx(spec, params, federation="", version=0, created_at=when)


def test_build_model_proto_matches_export() -> None:
    spec = ZOO_SPECS["linear-multi-prep"]
    params = _perturbed(spec, 8)
    proto = build_model_proto(spec, params, federation="x", version=9, created_at=1.0)
    assert proto.SerializeToString() == export_onnx(
        spec, params, federation="x", version=9, created_at=1.0
    )


def test_importing_fedmqtt_does_not_import_onnx() -> None:
    code = (
        "import sys, fedmqtt, fedmqtt.models, fedmqtt.wire\n"
        "bad = {'onnx', 'onnxruntime'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="module")
def digits() -> tuple[F32, npt.NDArray[np.int64]]:
    X, y = load_digits(return_X_y=True)
    return X.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def diabetes() -> tuple[F32, F32]:
    X, y = load_diabetes(return_X_y=True, scaled=False)
    return X.astype(np.float32), y.astype(np.float32)


def _rows(X: npt.NDArray[Any], batch: int) -> npt.NDArray[Any]:
    """``batch`` rows of ``X`` (cycled if ``X`` is shorter)."""
    rows: npt.NDArray[Any] = X[np.arange(batch) % X.shape[0]]
    return rows


DIGIT_SCALE = (1.0 / 16.0,) * 64


def _zoo_models() -> dict[str, Callable[[Any, Any], Any]]:
    """Trained zoo estimators; the raw-pixel and raw-unit models carry their preprocessing."""
    return {
        "softmax-regression": lambda X, y: SoftmaxRegression(
            ModelSpec("softmax", 64, 10, feature_scale=DIGIT_SCALE), epochs=5
        ).fit(X, y),
        "mlp-classifier-1": lambda X, y: MLPClassifier(
            ModelSpec("mlp", 64, 10, hidden=(32,), feature_scale=DIGIT_SCALE), epochs=5
        ).fit(X, y),
        "mlp-classifier-2": lambda X, y: MLPClassifier(
            ModelSpec(
                "mlp",
                64,
                10,
                hidden=(32, 16),
                feature_offset=(8.0,) * 64,
                feature_scale=DIGIT_SCALE,
            ),
            epochs=5,
        ).fit(X, y),
        "mlp-binary-labels": lambda X, y: MLPClassifier(
            ModelSpec("mlp", 64, 2, hidden=(8,), classes=(2, 5), feature_scale=DIGIT_SCALE),
            epochs=3,
        ).fit(X, np.where(y >= 5, 5, 2)),
    }


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(_zoo_models()))
def test_trained_zoo_classifiers_on_digits(name: str, batch: int, digits: Any) -> None:
    X, y = digits
    model = _zoo_models()[name](X, y)
    spec, params = model.spec, model.get_weights()
    model_bytes = export_onnx(spec, params, federation="d", version=1, created_at=0)
    _check_graph(model_bytes)
    Xb = _rows(X, batch)
    _check_parity(spec, params, model_bytes, Xb)
    out = _run(_session(model_bytes), Xb)
    np.testing.assert_array_equal(out["label"], model.predict(Xb))
    np.testing.assert_allclose(
        out["probabilities"], model.predict_proba(Xb), rtol=P_RTOL, atol=P_ATOL
    )
    # and on random raw pixels in the sensor's range
    Xr = np.random.default_rng(batch).uniform(0, 16, (batch, 64)).astype(np.float32)
    _check_parity(spec, params, model_bytes, Xr)
    if batch == 1000:  # the models did learn something, so the parity is not on noise
        truth = np.where(y >= 5, 5, 2) if "binary" in name else y
        assert np.mean(out["label"] == _rows(truth, batch)) > 0.8


@pytest.mark.parametrize("batch", BATCHES)
def test_trained_linear_regression_on_diabetes(batch: int, diabetes: Any) -> None:
    X, y = diabetes
    mean, std = X.mean(axis=0), X.std(axis=0)
    spec = ModelSpec(
        "linear",
        10,
        1,
        feature_offset=tuple(map(float, mean)),
        feature_scale=tuple(float(1 / s) for s in std),
    )
    model = LinearRegression(spec, epochs=20, lr=0.01).fit(X, y)
    params = model.get_weights()
    model_bytes = export_onnx(spec, params, federation="d", version=1, created_at=0)
    _check_graph(model_bytes)
    Xb = _rows(X, batch)
    _check_parity(spec, params, model_bytes, Xb)
    out = _run(_session(model_bytes), Xb)["prediction"]
    np.testing.assert_allclose(out[:, 0], model.predict(Xb), rtol=1e-4)
    Xr = (mean + std * np.random.default_rng(batch).normal(size=(batch, 10))).astype(np.float32)
    _check_parity(spec, params, model_bytes, Xr)
    if batch == 1000:
        assert model.score(X, y) > 0.3


# --------------------------------------------------------------------------- scikit-learn


def _binary_target(y: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    return np.where(y >= 5, 9, 4)  # labels 4 and 9, not 0/1 on purpose


SKLEARN: dict[str, tuple[Callable[[], Any], str, bool]] = {
    # name: (factory, task, predict_proba is a softmax and must match)
    "logreg-binary": (lambda: LogisticRegression(max_iter=500), "binary", True),
    "logreg-multiclass": (lambda: LogisticRegression(max_iter=500), "multiclass", True),
    "sgd-classifier": (lambda: SGDClassifier(loss="log_loss", random_state=0), "multiclass", False),
    "sgd-classifier-binary": (lambda: SGDClassifier(random_state=0), "binary", False),
    "sgd-regressor": (lambda: SGDRegressor(random_state=0, max_iter=200), "regression", False),
    "mlp-1": (lambda: SkMLP((32,), max_iter=80, random_state=0), "multiclass", True),
    "mlp-2": (lambda: SkMLP((32, 16), max_iter=80, random_state=0), "multiclass", True),
    "mlp-binary": (lambda: SkMLP((16,), max_iter=80, random_state=0), "binary", True),
}


@pytest.fixture(scope="module")
def fitted_sklearn(digits: Any, diabetes: Any) -> dict[str, tuple[Any, F32]]:
    """Each estimator fitted once, with the inputs it was fitted on."""
    Xd, yd = digits
    Xd = Xd / np.float32(16.0)
    Xr, yr = diabetes
    Xr = ((Xr - Xr.mean(axis=0)) / Xr.std(axis=0)).astype(np.float32)
    out: dict[str, tuple[Any, F32]] = {}
    for name, (factory, task, _) in SKLEARN.items():
        if task == "regression":
            out[name] = (factory().fit(Xr, yr), Xr)
        else:
            y = _binary_target(yd) if task == "binary" else yd
            out[name] = (factory().fit(Xd, y), Xd)
    return out


@pytest.mark.parametrize("name", list(SKLEARN))
def test_sklearn_export_is_valid_standard_onnx(name: str, fitted_sklearn: Any) -> None:
    est, _ = fitted_sklearn[name]
    model_bytes = export_sklearn(est, federation="sk", version=5, created_at=3.0)
    _check_graph(model_bytes)
    meta = read_metadata(model_bytes)
    assert meta["fedmqtt.federation"] == "sk"
    assert meta["fedmqtt.version"] == "5"
    if hasattr(est, "classes_"):
        assert json.loads(meta["fedmqtt.classes"]) == est.classes_.tolist()


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("name", list(SKLEARN))
def test_sklearn_parity(name: str, batch: int, fitted_sklearn: Any) -> None:
    est, X = fitted_sklearn[name]
    _, task, proba_is_softmax = SKLEARN[name]
    spec, params = from_sklearn(est)
    model_bytes = export_sklearn(est)
    Xb = _rows(X, batch)
    _check_parity(spec, params, model_bytes, Xb)  # numpy model vs onnxruntime
    rng = np.random.default_rng(batch)
    Xr = rng.uniform(0, 1, Xb.shape) if task != "regression" else rng.normal(size=Xb.shape)
    _check_parity(spec, params, model_bytes, Xr)
    out = _run(_session(model_bytes), Xb)
    if task == "regression":  # the estimator itself computes in float64
        np.testing.assert_allclose(out["prediction"][:, 0], est.predict(Xb), rtol=1e-4)
    else:
        np.testing.assert_array_equal(out["label"], est.predict(Xb))
        if proba_is_softmax:
            np.testing.assert_allclose(
                out["probabilities"], est.predict_proba(Xb), rtol=1e-4, atol=1e-5
            )


def test_export_sklearn_defaults_created_at_to_now(fitted_sklearn: Any) -> None:
    est, _ = fitted_sklearn["logreg-binary"]
    before = time.time()
    meta = read_metadata(export_sklearn(est))
    assert before <= float(meta["fedmqtt.created_at"]) <= time.time()
    assert meta["fedmqtt.federation"] == ""
    assert meta["fedmqtt.version"] == "0"


def test_export_sklearn_refuses_unsupported_estimators() -> None:
    est = DecisionTreeClassifier().fit([[0.0], [1.0]], [0, 1])
    with pytest.raises(ValueError, match="unsupported"):
        export_sklearn(est)
