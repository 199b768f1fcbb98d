"""Anomaly detection: the autoencoder kind, its scores, the federated threshold, ONNX parity.

The end-to-end run over a real broker is in tests/test_anomaly_e2e.py.
"""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from test_aggregator_support import FED, Federation

from aggregator.checkpoint import decode_state
from aggregator.engine import Engine
from aggregator.metrics import Metrics
from fedmqtt import codecs, topics, wire
from fedmqtt.aggregation.threshold import ThresholdEstimator, pooled_quantile
from fedmqtt.errors import DecodeError
from fedmqtt.models import loss_and_grad
from fedmqtt.models.anomaly import (
    Autoencoder,
    anomaly_scores,
    autoencoder_spec,
    quantile_level,
    report_levels,
    score_quantile,
    score_quantiles,
)
from fedmqtt.models.dense import init_params
from fedmqtt.models.spec import ModelSpec
from fedmqtt.onnx_export import IR_VERSION, OPSET, export_onnx, read_metadata
from fedmqtt.params import Params

AE_OPS = {"Sub", "Mul", "MatMul", "Add", "Relu", "ReduceMean", "Greater", "Cast"}


def _perturbed(spec: ModelSpec, seed: int) -> Params:
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.normal(0.0, 0.3, v.shape)).astype(np.float32)
        for k, v in init_params(spec, rng).items()
    }


# ---- the model kind --------------------------------------------------------------------


def test_spec_rules() -> None:
    spec = autoencoder_spec(8, bottleneck=3, hidden=6, quantile=0.95)
    assert spec.hidden == (6, 3, 6) and spec.n_outputs == 8
    assert quantile_level(spec) == 0.95
    assert quantile_level(autoencoder_spec(8, bottleneck=2)) == 0.99
    assert not spec.is_classifier and spec.is_autoencoder
    assert ModelSpec.from_wire(spec.to_wire()) == spec
    for bad in (
        {"n_outputs": 7, "hidden": (3,)},  # must reconstruct its input
        {"n_outputs": 8, "hidden": ()},  # needs a bottleneck
        {"n_outputs": 8, "hidden": (4, 3, 2, 3)},
        {"n_outputs": 8, "hidden": (3,), "extra": {"quantile": 1.0}},
        {"n_outputs": 8, "hidden": (3,), "extra": {"quantile": "high"}},
        {"n_outputs": 8, "hidden": (3,), "classes": tuple(range(8))},
    ):
        with pytest.raises(ValueError):
            ModelSpec("autoencoder", 8, **bad)  # type: ignore[arg-type]


def test_loss_is_half_the_mean_score() -> None:
    """The loss is half the mean squared reconstruction error of the preprocessed input, and
    the score of a row is the mean of its squares (gradients: tests/test_models.py)."""
    spec = ModelSpec("autoencoder", 4, 4, hidden=(3, 2, 3), feature_scale=(2,) * 4)
    rng = np.random.default_rng(3)
    p32 = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in spec.param_shapes().items()}
    X = rng.standard_normal((9, 4))
    loss, _ = loss_and_grad(spec, p32, X, None)
    assert loss == pytest.approx(0.5 * float(np.mean(anomaly_scores(spec, p32, X))), rel=1e-5)


@pytest.fixture(scope="module")
def cancer() -> dict[str, Any]:
    """breast_cancer as novelty detection: benign (label 1) is normal, malignant anomalous."""
    X, y = load_breast_cancer(return_X_y=True)
    X = X.astype(np.float32)
    benign, malignant = X[y == 1], X[y == 0]
    order = np.random.default_rng(0).permutation(len(benign))
    train = benign[order[:250]]
    test = np.concatenate([benign[order[250:]], malignant])
    labels = np.r_[np.zeros(len(benign) - 250), np.ones(len(malignant))]
    sd = train.std(axis=0)
    spec = autoencoder_spec(
        30,
        bottleneck=4,
        hidden=16,
        feature_offset=tuple(float(v) for v in train.mean(axis=0)),
        feature_scale=tuple(float(1 / v) for v in sd),
    )
    return {"spec": spec, "train": train, "test": test, "labels": labels}


def test_trained_autoencoder_separates_novelties(cancer: dict[str, Any]) -> None:
    spec = cancer["spec"]
    untrained = Autoencoder(spec, seed=0)
    before = float(np.mean(untrained.score_samples(cancer["train"])))
    model = Autoencoder(spec, epochs=40, lr=0.01, seed=0).fit(cancer["train"])
    scores = model.score_samples(cancer["test"])
    assert float(np.mean(model.score_samples(cancer["train"]))) < 0.7 * before
    assert roc_auc_score(cancer["labels"], scores) > 0.9
    # About 1 % of the training data lies above its own 0.99 quantile.
    flagged = float(np.mean(model.predict(cancer["train"])))
    assert 0.0 < flagged <= 0.02
    # Most malignant samples are flagged, most benign held-out ones are not.
    pred = model.predict(cancer["test"])
    lab = cancer["labels"]
    assert pred[lab == 1].mean() > 0.5 and pred[lab == 0].mean() < 0.2


def test_score_quantile() -> None:
    assert score_quantile(np.arange(101.0), 0.99) == pytest.approx(99.0)
    for bad in ([], [1.0, math.nan], [[1.0]]):
        with pytest.raises(ValueError):
            score_quantile(bad, 0.99)
    with pytest.raises(ValueError):
        score_quantile([1.0], 1.0)


# ---- the federated threshold -----------------------------------------------------------


def _report(scores: np.ndarray, q: float = 0.99) -> tuple[tuple[float, float], ...]:
    levels = report_levels(q)
    return tuple(zip(levels, score_quantiles(scores, levels), strict=True))


def test_pooled_quantile_of_devices_whose_scores_differ() -> None:
    """The estimate is the quantile of the pooled scores, which an average of the devices'
    own quantiles is not when one device's scores run higher than the others'."""
    rng = np.random.default_rng(0)
    devices = [rng.exponential(1.0, 400), rng.exponential(1.2, 900), rng.exponential(4.0, 300)]
    pooled = float(np.quantile(np.concatenate(devices), 0.99))
    got = pooled_quantile([(_report(s), len(s)) for s in devices], 0.99)
    assert got == pytest.approx(pooled, rel=0.05)
    mean_of_quantiles = sum(len(s) * np.quantile(s, 0.99) for s in devices) / 1600
    assert abs(mean_of_quantiles - pooled) > 0.2 * pooled  # the naive estimator is far off
    # Alike devices: the estimate is their common quantile.
    same = [(_report(rng.normal(5, 1, 2000) ** 2), 2000) for _ in range(4)]
    common = float(np.mean([dict(p)[0.99] for p, _ in same]))
    assert pooled_quantile(same, 0.99) == pytest.approx(common, rel=0.03)


def test_threshold_estimator_freshness_replacement_and_state() -> None:
    est = ThresholdEstimator(0.9, max_age=2)
    assert est.estimate(0) is None
    a, b = ((0.5, 1.0), (0.9, 2.0)), ((0.5, 3.0), (0.9, 6.0))
    est.report("a", a, 100, 0)
    est.report("b", b, 100, 0)
    both = est.estimate(1)
    assert both is not None and 2.0 < both < 6.0
    est.report("a", ((0.5, 1.5), (0.9, 2.5)), 100, 1)  # replaces a's older report
    assert len(est) == 2
    assert est.estimate(3) == pytest.approx(2.5)  # b's report (base 0) is too old for v3
    assert est.estimate(4) is None
    again = ThresholdEstimator(0.9, max_age=2)
    again.load_state(json.loads(json.dumps(est.to_state())))
    assert again.reports == est.reports
    for bad in (
        (),
        ((0.9, math.nan),),
        ((0.9, -1.0),),
        ((1.0, 2.0),),
        ((0.5, 3.0), (0.9, 2.0)),  # decreasing
        ((0.9, 1.0), (0.9, 2.0)),  # one level twice
    ):
        with pytest.raises(ValueError):
            est.report("c", bad, 10, 0)
    assert "c" not in est.reports
    small = ThresholdEstimator(0.9, max_age=5, max_devices=2)
    for i, d in enumerate("xyz"):
        small.report(d, a, 1, i)
    assert set(small.reports) == {"y", "z"}  # the oldest report went first


def test_wire_fields() -> None:
    spec = autoencoder_spec(3, bottleneck=1)
    params = init_params(spec, np.random.default_rng(0))
    m = wire.GlobalModel(FED, "agg", 4, spec, params, threshold=0.25)
    from fedmqtt.signing import Ed25519Signer

    signer = Ed25519Signer.generate()
    specs = {spec.fingerprint(): spec}
    back = wire.decode(wire.encode(m, signer), wire.GlobalModel, signer.verifier(), specs=specs)
    assert back.threshold == 0.25
    plain = wire.GlobalModel(FED, "agg", 4, spec, params)
    assert "threshold" not in plain.to_body()
    body = m.to_body()
    body["threshold"] = -1.0
    with pytest.raises(DecodeError):
        wire.GlobalModel.from_body(body, specs)
    assert wire.score_quantiles({"loss": 1.0}) is None
    k = wire.score_quantile_key
    assert wire.score_quantiles({k(0.99): 2.5, "loss": 1.0, k(0.5): 1.0}) == (
        (0.5, 1.0),
        (0.99, 2.5),
    )
    for bad in (
        {k(0.99): math.nan},
        {k(0.99): math.inf},
        {k(0.99): -0.5},
        {k(0.5): 3.0, k(0.9): 2.0},
        {"score_q:high": 1.0},
        {"score_q:1.5": 1.0},
        {k(i / 100): float(i) for i in range(50, 50 + wire.MAX_SCORE_QUANTILES + 1)},
    ):
        with pytest.raises(DecodeError):
            wire.score_quantiles(bad)


def _points(q: float) -> tuple[tuple[float, float], ...]:
    return ((0.5, 0.5 * q / 0.99), (0.99, q))


def _update(fed: Federation, device: str, q: float | None, n: int, base: int = 0) -> bytes:
    """An update whose report says: the device's scores lie uniformly in [0, q / 0.99]."""
    delta = fed.layout.unflatten(np.full(fed.layout.size, 1e-3, np.float32))
    enc = codecs.encode_params(delta, codecs.Codec("raw"), rng=np.random.default_rng(0))
    metrics = {"loss": 1.0}
    if q is not None:
        metrics |= {wire.score_quantile_key(lv): v for lv, v in _points(q)}
    u = wire.Update(FED, device, uuid.uuid4().hex, 0, base, n, fed.spec.fingerprint(), enc, metrics)
    return wire.encode(u, fed.keys[device])


def test_engine_combines_reports_rejects_bad_ones_and_checkpoints(tmp_path: Path) -> None:
    spec = autoencoder_spec(4, bottleneck=2)
    fed = Federation(tmp_path, spec, devices=("d0", "d1", "d2"))
    cfg = fed.config("127.0.0.1", 1883, strategy={"buffer_size": 2, "max_staleness": 3})
    e = Engine(cfg, Metrics(FED), keys=None)
    t = topics.updates
    e.process([(t(FED, "d0"), _update(fed, "d0", 1.0, 100))], 0.0)
    e.process([(t(FED, "d1"), _update(fed, "d1", math.nan, 100))], 0.0)  # refused
    e.process([(t(FED, "d1"), _update(fed, "d1", -2.0, 100))], 0.0)  # refused
    assert e.version == 0 and len(e.strategy) == 1 and len(e.thresholds or ()) == 1
    assert e.metrics.snapshot()["rejected"]["schema"] == 2
    e.process([(t(FED, "d1"), _update(fed, "d1", 4.0, 300))], 0.0)
    expected = pooled_quantile([(_points(1.0), 100), (_points(4.0), 300)], 0.99)
    assert 1.0 < expected < 4.0
    assert e.version == 1 and e.threshold == pytest.approx(expected)
    assert e.snapshot().threshold == pytest.approx(expected)
    # An update without a report (an older agent) changes nothing about the threshold.
    e.process([(t(FED, "d2"), _update(fed, "d2", None, 50, base=1))], 0.0)
    e.process([(t(FED, "d0"), _update(fed, "d0", 2.0, 100, base=1))], 0.0)
    expected = pooled_quantile([(_points(2.0), 100), (_points(4.0), 300)], 0.99)
    assert e.version == 2 and e.threshold == pytest.approx(expected)
    restored = Engine(cfg, Metrics(FED), keys=None)
    restored.restore(decode_state(e.snapshot().data))
    assert restored.threshold == e.threshold
    assert restored.thresholds is not None and e.thresholds is not None
    assert restored.thresholds.reports == e.thresholds.reports


# ---- ONNX ------------------------------------------------------------------------------

SPECS = {
    "plain": ModelSpec("autoencoder", 6, 6, hidden=(2,)),
    "deep-prep": ModelSpec(
        "autoencoder",
        6,
        6,
        hidden=(5, 3, 5),
        feature_offset=(1.0, -2.0, 0.5, 0.0, 3.0, 10.0),
        feature_scale=(0.5, 2.0, 1.0, 0.1, 1.5, 0.01),
        extra={"quantile": 0.9},
    ),
    "offset-only": ModelSpec("autoencoder", 6, 6, hidden=(4, 2), feature_offset=(5.0,) * 6),
}


@pytest.mark.parametrize("batch", [1, 1000])
@pytest.mark.parametrize("name", list(SPECS))
def test_onnx_parity_standard_ops_and_metadata(name: str, batch: int) -> None:
    spec = SPECS[name]
    params = _perturbed(spec, 1)
    X = np.random.default_rng(batch).normal(0.0, 3.0, (batch, 6)).astype(np.float32)
    ref = anomaly_scores(spec, params, X)
    threshold = float(np.median(ref))
    data = export_onnx(spec, params, federation=FED, version=3, created_at=1.0, threshold=threshold)
    model = onnx.load_from_string(data)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", OPSET)]
    assert model.ir_version == IR_VERSION
    assert {n.op_type for n in model.graph.node} <= AE_OPS
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    assert [o.name for o in sess.get_outputs()] == ["score", "decision"]
    score, decision = sess.run(["score", "decision"], {"features": X})
    assert score.dtype == np.float32 and score.shape == (batch,)
    np.testing.assert_allclose(score, ref, rtol=1e-5, atol=1e-6 * float(ref.max()))
    assert decision.dtype == np.int64
    clear = np.abs(ref - threshold) > 1e-5 * threshold  # no row within rounding of the threshold
    np.testing.assert_array_equal(decision[clear], (ref > np.float32(threshold))[clear])
    meta = read_metadata(data)
    assert meta["fedmqtt.kind"] == "autoencoder"
    assert json.loads(meta["fedmqtt.threshold"]) == threshold
    assert float(meta["fedmqtt.quantile"]) == quantile_level(spec)


def test_onnx_without_threshold_flags_nothing_and_bad_threshold_is_refused() -> None:
    spec = SPECS["plain"]
    params = _perturbed(spec, 2)
    data = export_onnx(spec, params, federation=FED, version=0, created_at=1.0)
    assert json.loads(read_metadata(data)["fedmqtt.threshold"]) is None
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    X = np.random.default_rng(0).normal(0, 100.0, (50, 6)).astype(np.float32)
    (decision,) = sess.run(["decision"], {"features": X})
    assert not decision.any()
    for bad in (math.nan, -1.0, math.inf):
        with pytest.raises(ValueError):
            export_onnx(spec, params, federation=FED, version=0, created_at=1.0, threshold=bad)


def test_device_reports_the_quantile_of_its_scores_under_the_base_model() -> None:
    from edge_agent.config import TrainingConfig
    from edge_agent.trainer import build_update, compute_delta, resolve_hyper
    from fedmqtt.signing import HmacKey

    spec = autoencoder_spec(5, bottleneck=2, quantile=0.9)
    params = init_params(spec, np.random.default_rng(0))
    model = wire.GlobalModel(FED, "agg", 2, spec, params)
    X = np.random.default_rng(1).normal(0, 1, (200, 5)).astype(np.float32)
    hyper = resolve_hyper(None, TrainingConfig())
    rng = np.random.default_rng(0)
    result = compute_delta(model, X, np.zeros(200), hyper, rng)
    scores = anomaly_scores(spec, params, X)
    levels = report_levels(0.9)
    assert 0.9 in levels and max(levels) > 0.9
    expected = {lv: float(np.quantile(scores, lv)) for lv in levels}
    assert result.score_quantiles is not None
    assert dict(result.score_quantiles) == pytest.approx(expected)
    update, _ = build_update(
        model,
        result,
        hyper,
        device_id="d0",
        federation=FED,
        seq=0,
        signer=HmacKey.generate(),
        rng=rng,
        feedback=None,
    )
    sent = wire.score_quantiles(update.metrics)
    assert sent is not None and dict(sent) == pytest.approx(expected)
    assert any(np.abs(d).max() > 0 for d in result.delta.values())  # it also trained


def test_unlabeled_data_files(tmp_path: Path) -> None:
    from edge_agent.config import DataConfig
    from edge_agent.data import DataError, load_data

    (tmp_path / "a.csv").write_text("t,rh,co2\n1,2,3\n4,5,6\n")
    X, y = load_data(DataConfig(source="csv", path=tmp_path, labels=False))
    assert X.tolist() == [[1, 2, 3], [4, 5, 6]] and y.shape == (2,)
    labelled, _ = load_data(DataConfig(source="csv", path=tmp_path))
    assert labelled.shape == (2, 2)  # by default the last column is the label
    np.savez(tmp_path / "b.npz", X=np.ones((3, 2)))
    X, _ = load_data(DataConfig(source="npz", path=tmp_path / "b.npz", labels=False))
    assert X.shape == (3, 2)
    with pytest.raises(DataError, match="'y'"):
        load_data(DataConfig(source="npz", path=tmp_path / "b.npz"))


def test_an_autoencoder_round_imports_nothing_heavy() -> None:
    """The agent's import footprint: scoring and the quantile report add no module that a
    softmax round does not load (tests/test_agent_process.py checks that round)."""
    import subprocess
    import sys
    import textwrap

    from test_agent_process import HEAVY, ROOT

    code = textwrap.dedent(f"""
        import json, sys
        import numpy as np
        import edge_agent.agent
        from edge_agent.config import TrainingConfig
        from edge_agent.trainer import build_update, compute_delta, resolve_hyper
        from fedmqtt import wire
        from fedmqtt.models import init_params
        from fedmqtt.models.spec import ModelSpec
        from fedmqtt.signing import HmacKey

        def round_of(spec, X):
            model = wire.GlobalModel("f", "a", 1, spec, init_params(spec, np.random.default_rng(0)))
            hyper = resolve_hyper(None, TrainingConfig())
            rng = np.random.default_rng(0)
            res = compute_delta(model, X, np.zeros(len(X), np.int64), hyper, rng)
            build_update(model, res, hyper, device_id="d", federation="f", seq=0,
                         signer=HmacKey.generate(), rng=rng, feedback=None)
            return set(sys.modules)

        X = np.random.default_rng(1).normal(size=(64, 8)).astype(np.float32)
        softmax = round_of(ModelSpec("softmax", 8, 2), X)
        ae = round_of(ModelSpec("autoencoder", 8, 8, hidden=(3,)), X)
        print(json.dumps({{"extra": sorted(ae - softmax),
                          "heavy": [m for m in ae if m.split(".")[0] in {HEAVY!r}]}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert json.loads(out.stdout) == {"extra": [], "heavy": []}


def test_auroc_and_holdout_evaluation(tmp_path: Path) -> None:
    from aggregator.evaluate import evaluate, load_holdout, metric_name
    from fedmqtt.errors import ConfigError
    from fedmqtt.models.anomaly import auroc

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.round(rng.normal(y, 1.0), 1)  # rounded: many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    with pytest.raises(ValueError):
        auroc(np.zeros(3), [1.0, 2.0, 3.0])
    spec = autoencoder_spec(4, bottleneck=2)
    params = _perturbed(spec, 0)
    X = rng.normal(0, 1, (50, 4)).astype(np.float32)
    labels = (anomaly_scores(spec, params, X) > 1.0).astype(np.int64)
    np.savez(tmp_path / "h.npz", X=X, y=labels)
    holdout = load_holdout(tmp_path / "h.npz", spec)
    flat = spec.layout().flatten(params)
    assert metric_name(spec) == "auroc"
    assert evaluate(spec, spec.layout(), flat, holdout) == 1.0  # labels from the scores
    np.savez(tmp_path / "bad.npz", X=X, y=np.full(50, 3))
    with pytest.raises(ConfigError, match="0 \\(normal\\) and 1"):
        load_holdout(tmp_path / "bad.npz", spec)
