"""Personalisation on the device: the head training, the personal model file and its trust rule,
and which model the predictor runs."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from test_agent_helpers import FED, SPEC, digits_like, global_model

from edge_agent.config import AgentConfig
from edge_agent.personal import (
    PERSONAL_FILE,
    PersonalModel,
    PersonalModelError,
    PersonalStore,
    build,
    decode,
    encode,
    load_trusted,
)
from edge_agent.predictor import GLOBAL_MODEL_FILE, Predictor, PredictorError
from edge_agent.state import spec_file
from fedmqtt import wire
from fedmqtt.errors import ConfigError
from fedmqtt.models.dense import forward, hidden_features, init_params
from fedmqtt.models.personal import head_names, train_head
from fedmqtt.models.spec import ModelSpec
from fedmqtt.models.train import TrainConfig, train_local
from fedmqtt.rand import LightRandom
from fedmqtt.signing import Ed25519Signer

MLP = ModelSpec("mlp", 64, 10, hidden=(16,), feature_scale=(1.0 / 16,) * 64)
TRAIN = TrainConfig(epochs=5, lr=0.1, batch_size=16, momentum=0.9)


def skewed(n: int, classes: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples of only ``classes``: one device's skewed share of the data."""
    X, y = digits_like(n * 4, seed)
    keep = np.isin(y, classes)
    return X[keep][:n], y[keep][:n]


def accuracy(spec: ModelSpec, params: dict[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> float:
    return float((np.asarray(spec.labels)[forward(spec, params, X).argmax(1)] == y).mean())


def test_head_mode_trains_only_the_last_layer_and_fits_the_device() -> None:
    # A weak global model (one short epoch on little data), as early in a federation.
    weak = TrainConfig(epochs=1, lr=0.01, batch_size=32)
    g, _ = train_local(
        MLP, init_params(MLP, np.random.default_rng(0)), *digits_like(64), weak, LightRandom(1)
    )
    X, y = skewed(200, (0, 1), seed=5)
    personal = train_head(MLP, g, None, X, y, config=TRAIN, rng=LightRandom(2))
    w, b = head_names(MLP)
    assert (w, b) == ("W1", "b1")
    np.testing.assert_array_equal(personal["W0"], g["W0"])  # the body is the global one
    np.testing.assert_array_equal(personal["b0"], g["b0"])
    assert not np.array_equal(personal[w], g[w])
    Xv, yv = skewed(200, (0, 1), seed=6)
    assert accuracy(MLP, personal, Xv, yv) > accuracy(MLP, g, Xv, yv)
    assert accuracy(MLP, personal, Xv, yv) > 0.95
    # The head is the one-layer model of the body's outputs: same predictions.
    feats = hidden_features(MLP, g, Xv)
    assert feats.shape == (len(Xv), 16)
    # A previous head is where the next training starts (not the global head).
    again = train_head(
        MLP, g, personal, X[:1], y[:1], config=replace(TRAIN, lr=1e-9, epochs=1), rng=LightRandom(3)
    )
    np.testing.assert_allclose(again[w], personal[w], atol=1e-6)
    fresh = train_head(
        MLP, g, None, X[:1], y[:1], config=replace(TRAIN, lr=1e-9, epochs=1), rng=LightRandom(3)
    )
    np.testing.assert_allclose(fresh[w], g[w], atol=1e-6)


def test_a_previous_head_of_another_architecture_is_not_used() -> None:
    g = init_params(MLP, np.random.default_rng(0))
    other = init_params(ModelSpec("mlp", 64, 10, hidden=(8,)), np.random.default_rng(1))
    X, y = skewed(50, (3,), seed=1)
    out = train_head(MLP, g, other, X, y, config=replace(TRAIN, epochs=1), rng=LightRandom(0))
    assert out["W1"].shape == (16, 10)


def personal_model(params: dict[str, np.ndarray] | None = None, **kw: object) -> PersonalModel:
    p = params if params is not None else init_params(SPEC, np.random.default_rng(0))
    fields: dict[str, object] = {
        "federation": FED,
        "device": "dev-1",
        "mode": "head",
        "version": 3,
        "spec": SPEC,
        "params": p,
        "created_at": 5.0,
        "onnx": None,
    }
    fields.update(kw)
    return PersonalModel(**fields)  # type: ignore[arg-type]


def test_the_file_round_trips_and_malformed_files_are_refused(tmp_path: Path) -> None:
    pm = personal_model(
        {k: v + 0.5 for k, v in init_params(SPEC, np.random.default_rng(0)).items()}
    )
    back = decode(encode(pm), "x")
    assert (back.device, back.federation, back.mode, back.version) == ("dev-1", FED, "head", 3)
    for k in pm.params:
        np.testing.assert_array_equal(back.params[k], pm.params[k])
    for junk in (b"", b"\x81\xa1a\x01", encode(pm)[:-10]):
        with pytest.raises(PersonalModelError):
            decode(junk, "junk")
    nan = {k: np.full_like(v, np.nan) for k, v in pm.params.items()}
    with pytest.raises(PersonalModelError, match="NaN"):
        decode(encode(personal_model(nan)), "nan")
    store = PersonalStore(tmp_path)
    store.save(pm)
    assert os.stat(tmp_path / PERSONAL_FILE).st_mode & 0o777 == 0o600
    assert store.load("dev-1", FED) is not None
    assert store.load("dev-2", FED) is None  # another device's file is not taken over


def test_finetune_mode_keeps_the_rounds_trained_model() -> None:
    from fedmqtt.onnx_export import read_metadata

    model = global_model(2)
    X, y = digits_like(100)
    trained = {k: v + 1 for k, v in model.params.items()}
    for onnx in (False, True):
        pm = build(
            "finetune",
            model,
            trained,
            None,
            (X, y),
            train=TRAIN,
            head_epochs=1,
            device="d",
            rng=LightRandom(0),
            onnx=onnx,
        )
        assert pm is not None and pm.version == 2
        np.testing.assert_array_equal(pm.params["W0"], trained["W0"])
        if not onnx:
            assert pm.onnx is None  # predict exports it when it loads it
        else:
            assert pm.onnx is not None
            assert read_metadata(pm.onnx)["fedmqtt.version"] == "2"


@pytest.fixture
def signer() -> Ed25519Signer:
    return Ed25519Signer.generate()


def deploy(state: Path, signer: Ed25519Signer, spec: ModelSpec = SPEC) -> Path:
    """A state directory with a signed global model and spec; returns the public key file."""
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    msg = wire.GlobalModel(
        FED, "aggregator", 3, spec, init_params(spec, np.random.default_rng(0)), created_at=1.0
    )
    (state / GLOBAL_MODEL_FILE).write_bytes(wire.encode(msg, signer))
    (state / spec_file(spec.fingerprint())).write_bytes(
        wire.encode(wire.SpecMessage(FED, "aggregator", spec), signer)
    )
    key = state.parent / "aggregator.pub"
    signer.verifier().save(key)
    return key


def test_the_predictor_runs_the_trusted_personal_model(
    tmp_path: Path, signer: Ed25519Signer
) -> None:
    state = tmp_path / "state"
    key = deploy(state, signer)
    X, _y = digits_like(60, seed=3)
    personal = {k: v.copy() for k, v in init_params(SPEC, np.random.default_rng(0)).items()}
    personal["W0"][:, 7] += 1.0  # always class 7: unmistakably not the (all-zero) global model
    PersonalStore(state).save(personal_model(personal))
    pred = Predictor.from_state_dir(state, key, federation=FED, personal_device="dev-1")
    assert pred.personal == "head" and pred.version == 3
    np.testing.assert_allclose(
        pred.predict_proba(X), forward(SPEC, personal, X), rtol=1e-5, atol=1e-6
    )
    assert set(pred.predict(X).tolist()) == {7}
    # Personalisation off: the signed global model, as before.
    glob = Predictor.from_state_dir(state, key, federation=FED)
    assert glob.personal is None
    # Personalisation on but no personal model yet: the global model.
    (state / PERSONAL_FILE).unlink()
    assert (
        Predictor.from_state_dir(state, key, federation=FED, personal_device="dev-1").personal
        is None
    )


@pytest.mark.parametrize(
    "tamper",
    [
        "group-writable",
        "directory-writable",
        "symlink",
        "other-device",
        "other-federation",
        "unsigned-spec",
    ],
)
def test_the_trust_rule_refuses_a_personal_model_from_elsewhere(
    tmp_path: Path, signer: Ed25519Signer, tamper: str
) -> None:
    state = tmp_path / "state"
    key = deploy(state, signer)
    pm = personal_model()
    if tamper == "other-device":
        pm = replace(pm, device="dev-2")
    elif tamper == "other-federation":
        pm = replace(pm, federation="elsewhere")
    elif tamper == "unsigned-spec":
        spec = ModelSpec("softmax", 64, 10)  # no feature scaling: a spec nobody signed
        pm = replace(pm, spec=spec, params=init_params(spec, np.random.default_rng(0)))
    path = state / PERSONAL_FILE
    if tamper == "symlink":
        (tmp_path / "planted.bin").write_bytes(encode(pm))
        os.chmod(tmp_path / "planted.bin", 0o600)
        path.symlink_to(tmp_path / "planted.bin")
    else:
        PersonalStore(state).save(pm)
    if tamper == "group-writable":
        os.chmod(path, 0o620)
    if tamper == "directory-writable":
        os.chmod(state, 0o777)
    with pytest.raises(PredictorError, match="the personal model was refused"):
        Predictor.from_state_dir(state, key, federation=FED, personal_device="dev-1")
    with pytest.raises(PersonalModelError):
        load_trusted(state, "dev-1", FED, {SPEC.fingerprint(): SPEC})


def test_the_personalise_options_are_checked() -> None:
    base = {
        "device": {"id": "d", "federation": FED, "state_dir": "s"},
        "security": {"aggregator_public_key": "k", "update_key": "u"},
        "data": {"source": "npz", "path": "p"},
    }
    cfg = AgentConfig.from_dict(base)
    assert (cfg.personalise.mode, cfg.personalise.head_epochs) == ("off", 5)
    cfg = AgentConfig.from_dict(
        {**base, "personalise": {"mode": "head", "head_epochs": 2, "onnx": True}}
    )
    p = cfg.personalise
    assert (p.mode, p.head_epochs, p.onnx) == ("head", 2, True)
    for bad, message in (
        ({"mode": "both"}, r"\[personalise\] mode: must be one of off, head, finetune"),
        ({"head_epochs": 0}, r"\[personalise\] head_epochs"),
        ({"epochs": 3}, r"\[personalise\]: unknown option"),
        ({"onnx": "yes"}, r"\[personalise\] onnx: must be true or false"),
    ):
        with pytest.raises(ConfigError, match=message):
            AgentConfig.from_dict({**base, "personalise": bad})


def test_storing_the_onnx_export_needs_the_onnx_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from edge_agent.personal import Personaliser

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnx" else real(name, *a)
    )
    with pytest.raises(ConfigError, match=r"\[personalise\] onnx = true needs the onnx package"):
        Personaliser("head", 1, onnx=True, state_dir=tmp_path, device="d", federation=FED)
    Personaliser("head", 1, onnx=False, state_dir=tmp_path, device="d", federation=FED)
