"""On-device inference: loading verified models from the state directory, and the predict CLI."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from edge_agent import predictor as predictor_mod
from edge_agent.predictor import (
    EXIT_INPUT,
    EXIT_MODEL,
    EXIT_OK,
    GLOBAL_MODEL_FILE,
    ONNX_MODEL_FILE,
    Predictor,
    PredictorError,
    predict_cli,
)
from edge_agent.state import spec_file
from fedmqtt import wire
from fedmqtt.models import ModelSpec, forward, init_params
from fedmqtt.onnx_export import export_onnx
from fedmqtt.params import Params
from fedmqtt.signing import Ed25519Signer

FED = "greenhouse"
P_RTOL, P_ATOL = 1e-5, 1e-6

SPEC = ModelSpec(
    "mlp",
    4,
    3,
    hidden=(8,),
    classes=(10, 20, 30),
    feature_offset=(20.0, 50.0, 400.0, 0.0),
    feature_scale=(0.1, 0.02, 0.005, 1.0),
    feature_names=("temp", "humidity", "co2", "door"),
)
REG_SPEC = ModelSpec("linear", 3, 1, feature_scale=(0.5, 0.5, 0.5))


def _params(spec: ModelSpec, seed: int) -> Params:
    rng = np.random.default_rng(seed)
    p = init_params(spec, rng)
    return {k: (v + rng.normal(0, 0.7, v.shape)).astype(np.float32) for k, v in p.items()}


def _raw_inputs(n: int, seed: int = 0) -> npt.NDArray[np.float32]:
    """Raw sensor-like values around the spec's offsets (the graph does the scaling)."""
    rng = np.random.default_rng(seed)
    centre = np.array([20.0, 50.0, 400.0, 0.5])
    spread = np.array([8.0, 30.0, 150.0, 0.5])
    return (centre + spread * rng.standard_normal((n, 4))).astype(np.float32)


class Keys:
    def __init__(self, tmp: Path) -> None:
        self.signer = Ed25519Signer.generate()
        self.pub = tmp / "aggregator.pub"
        self.signer.verifier().save(self.pub)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return Keys(tmp_path)


def _write_onnx_msg(
    state: Path,
    signer: Ed25519Signer,
    spec: ModelSpec,
    params: Params,
    version: int,
    *,
    fed: str = FED,
    msg_version: int | None = None,
) -> None:
    onnx_bytes = export_onnx(spec, params, federation=fed, version=version, created_at=100.0)
    msg = wire.OnnxModel(
        fed,
        "aggregator",
        version if msg_version is None else msg_version,
        onnx_bytes,
        created_at=100.0,
    )
    state.mkdir(parents=True, exist_ok=True)
    (state / ONNX_MODEL_FILE).write_bytes(wire.encode(msg, signer))


def _write_global_msg(
    state: Path,
    signer: Ed25519Signer,
    spec: ModelSpec,
    params: Params,
    version: int,
    *,
    fed: str = FED,
) -> None:
    msg = wire.GlobalModel(fed, "aggregator", version, spec, params, created_at=200.0)
    state.mkdir(parents=True, exist_ok=True)
    (state / GLOBAL_MODEL_FILE).write_bytes(wire.encode(msg, signer))
    spec_msg = wire.SpecMessage(fed, "aggregator", spec)
    (state / spec_file(spec.fingerprint())).write_bytes(wire.encode(spec_msg, signer))


def _expect_same(pred: Predictor, spec: ModelSpec, params: Params, X: npt.ArrayLike) -> None:
    ref = forward(spec, params, X)
    np.testing.assert_allclose(pred.predict_proba(X), ref, rtol=P_RTOL, atol=P_ATOL)
    labels = np.asarray(spec.labels)[np.argmax(ref, axis=1)]
    np.testing.assert_array_equal(pred.predict(X), labels)


# --------------------------------------------------------------------------- loading


def test_from_state_dir_with_signed_onnx_model(tmp_path: Path, keys: Keys) -> None:
    params = _params(SPEC, 1)
    _write_onnx_msg(tmp_path / "state", keys.signer, SPEC, params, version=7)
    pred = Predictor.from_state_dir(tmp_path / "state", keys.pub, federation=FED)
    assert pred.version == 7
    assert pred.classes == [10, 20, 30]
    assert pred.n_features == 4
    assert pred.feature_names == list(SPEC.feature_names)
    assert pred.federation == FED
    assert pred.is_classifier
    for batch in (1, 1000):
        _expect_same(pred, SPEC, params, _raw_inputs(batch, seed=batch))


def test_from_state_dir_with_only_a_signed_global_model(tmp_path: Path, keys: Keys) -> None:
    params = _params(SPEC, 2)
    _write_global_msg(tmp_path, keys.signer, SPEC, params, version=4)
    pred = Predictor.from_state_dir(tmp_path, keys.pub)
    assert pred.version == 4
    assert pred.classes == [10, 20, 30]
    _expect_same(pred, SPEC, params, _raw_inputs(500))


def test_newest_verified_version_wins(tmp_path: Path, keys: Keys) -> None:
    """ONNX exports may be published only every N versions: a newer global model is used."""
    old, new = _params(SPEC, 3), _params(SPEC, 4)
    _write_onnx_msg(tmp_path, keys.signer, SPEC, old, version=5)
    _write_global_msg(tmp_path, keys.signer, SPEC, new, version=6)
    pred = Predictor.from_state_dir(tmp_path, keys.pub)
    assert pred.version == 6
    _expect_same(pred, SPEC, new, _raw_inputs(50))


def test_published_export_wins_on_equal_versions(tmp_path: Path, keys: Keys) -> None:
    onnx_params, global_params = _params(SPEC, 5), _params(SPEC, 6)
    _write_onnx_msg(tmp_path, keys.signer, SPEC, onnx_params, version=9)
    _write_global_msg(tmp_path, keys.signer, SPEC, global_params, version=9)
    pred = Predictor.from_state_dir(tmp_path, keys.pub)
    _expect_same(pred, SPEC, onnx_params, _raw_inputs(50))


def test_rejects_a_model_signed_by_another_key(tmp_path: Path, keys: Keys) -> None:
    intruder = Ed25519Signer.generate()
    _write_onnx_msg(tmp_path, intruder, SPEC, _params(SPEC, 7), version=1)
    with pytest.raises(PredictorError, match="signature"):
        Predictor.from_state_dir(tmp_path, keys.pub)


def test_rejects_a_global_model_signed_by_another_key(tmp_path: Path, keys: Keys) -> None:
    _write_global_msg(tmp_path, Ed25519Signer.generate(), SPEC, _params(SPEC, 7), version=1)
    with pytest.raises(PredictorError, match="pinned aggregator key"):
        Predictor.from_state_dir(tmp_path, keys.pub)


def test_rejects_a_tampered_file(tmp_path: Path, keys: Keys) -> None:
    """A bad file is an error, never silently skipped in favour of the other one."""
    params = _params(SPEC, 8)
    _write_global_msg(tmp_path, keys.signer, SPEC, params, version=1)
    _write_onnx_msg(tmp_path, keys.signer, SPEC, params, version=2)
    path = tmp_path / ONNX_MODEL_FILE
    data = bytearray(path.read_bytes())
    data[-40] ^= 0x01  # inside the ONNX bytes, under the signature
    path.write_bytes(bytes(data))
    with pytest.raises(PredictorError, match="refused"):
        Predictor.from_state_dir(tmp_path, keys.pub)


def test_no_model_yet_is_a_clear_error(tmp_path: Path, keys: Keys) -> None:
    with pytest.raises(PredictorError, match="no model"):
        Predictor.from_state_dir(tmp_path / "empty", keys.pub)


def test_missing_public_key_is_a_clear_error(tmp_path: Path, keys: Keys) -> None:
    _write_onnx_msg(tmp_path, keys.signer, SPEC, _params(SPEC, 1), version=1)
    with pytest.raises(PredictorError, match="aggregator public key"):
        Predictor.from_state_dir(tmp_path, tmp_path / "nope.pub")


def test_model_of_another_federation_is_refused(tmp_path: Path, keys: Keys) -> None:
    _write_onnx_msg(tmp_path, keys.signer, SPEC, _params(SPEC, 1), version=1, fed="other")
    with pytest.raises(PredictorError, match="federation"):
        Predictor.from_state_dir(tmp_path, keys.pub, federation=FED)
    assert Predictor.from_state_dir(tmp_path, keys.pub).federation == "other"


def test_message_and_model_versions_must_agree(tmp_path: Path, keys: Keys) -> None:
    _write_onnx_msg(tmp_path, keys.signer, SPEC, _params(SPEC, 1), version=3, msg_version=4)
    with pytest.raises(PredictorError, match="version"):
        Predictor.from_state_dir(tmp_path, keys.pub)


def test_from_bytes_regression() -> None:
    params = _params(REG_SPEC, 9)
    pred = Predictor.from_bytes(
        export_onnx(REG_SPEC, params, federation="r", version=2, created_at=0)
    )
    assert pred.classes is None
    assert not pred.is_classifier
    assert pred.n_outputs == 1
    X = np.random.default_rng(0).normal(0, 5, (1000, 3)).astype(np.float32)
    y = pred.predict(X)
    assert y.shape == (1000,)
    ref = forward(REG_SPEC, params, X)[:, 0]
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * float(np.abs(ref).max()))
    with pytest.raises(PredictorError, match="no class probabilities"):
        pred.predict_proba(X)


def test_input_validation() -> None:
    params = _params(SPEC, 10)
    pred = Predictor.from_bytes(export_onnx(SPEC, params, federation="", version=0, created_at=0))
    with pytest.raises(PredictorError, match="takes 4 features"):
        pred.predict(np.zeros((2, 5)))
    with pytest.raises(PredictorError, match="numeric"):
        pred.predict(np.array([["a", "b", "c", "d"]]))
    row = _raw_inputs(1)[0]  # a single 1-D row is one sample
    np.testing.assert_array_equal(pred.predict(row), pred.predict(row.reshape(1, 4)))
    assert pred.predict(np.asarray([[20, 50, 400, 1]], dtype=np.int64)).shape == (1,)


def test_from_bytes_rejects_junk() -> None:
    with pytest.raises(PredictorError, match="cannot load"):
        Predictor.from_bytes(b"not a model")


def test_missing_onnxruntime_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    with pytest.raises(PredictorError, match=r"pip install 'fedmqtt\[onnx\]'"):
        Predictor.from_bytes(b"")


def test_threads_are_configurable() -> None:
    model = export_onnx(SPEC, _params(SPEC, 1), federation="", version=0, created_at=0)
    pred = Predictor.from_bytes(model, intra_op_num_threads=2)
    assert pred.predict(_raw_inputs(3)).shape == (3,)
    with pytest.raises(ValueError, match="intra_op_num_threads"):
        Predictor.from_bytes(model, intra_op_num_threads=0)


def test_importing_the_agent_does_not_import_onnx() -> None:
    code = (
        "import sys, edge_agent, edge_agent.predictor\n"
        "bad = {'onnx', 'onnxruntime'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- the CLI


def _agent_toml(tmp: Path, label_column: str | int = "label", *, key: bool = True) -> Path:
    """A complete agent.toml (the agent's loader validates it all); paths relative to it."""
    label = json.dumps(label_column)
    pub = 'aggregator_public_key = "aggregator.pub"\n' if key else ""
    cfg = tmp / ("agent.toml" if key else "nokey.toml")
    cfg.write_text(
        f'[device]\nid = "dev-1"\nfederation = "{FED}"\nstate_dir = "state"\n\n'
        f'[security]\n{pub}update_key = "dev-1.hmac"\n\n'
        f'[data]\nsource = "csv"\npath = "data.csv"\nlabel_column = {label}\n'
    )
    return cfg


@pytest.fixture
def deployed(tmp_path: Path, keys: Keys) -> tuple[Path, Params]:
    params = _params(SPEC, 11)
    _write_onnx_msg(tmp_path / "state", keys.signer, SPEC, params, version=12)
    return _agent_toml(tmp_path), params


def _write_csv(path: Path, header: list[str] | None, rows: Any) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        if header is not None:
            w.writerow(header)
        for r in rows:
            w.writerow([repr(float(v)) for v in r])
    return path


def _run_cli(cfg: Path, inp: Path, fmt: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = predict_cli(cfg, inp, fmt, out, err=err)
    return code, out.getvalue(), err.getvalue()


def test_cli_csv_with_reordered_header_and_label_column(
    tmp_path: Path, deployed: tuple[Path, Params]
) -> None:
    cfg, params = deployed
    X = _raw_inputs(25, seed=3)
    # columns shuffled, plus the training label column: both handled by name
    order = [2, 0, 3, 1]
    header = ["label", *(SPEC.feature_names[i] for i in order)]
    rows = np.column_stack([np.full(25, 20.0), X[:, order]])
    code, out, err = _run_cli(cfg, _write_csv(tmp_path / "in.csv", header, rows), "csv")
    assert code == EXIT_OK, err
    assert "25 rows" in err and "version 12" in err
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["label", "p_10", "p_20", "p_30"]
    got = np.array(table[1:], dtype=np.float64)
    ref = forward(SPEC, params, X)
    np.testing.assert_array_equal(got[:, 0], np.asarray(SPEC.labels)[ref.argmax(axis=1)])
    np.testing.assert_allclose(got[:, 1:], ref, rtol=P_RTOL, atol=P_ATOL)


def test_cli_json_lines_without_header(tmp_path: Path, deployed: tuple[Path, Params]) -> None:
    cfg, params = deployed
    X = _raw_inputs(7, seed=4)
    code, out, err = _run_cli(cfg, _write_csv(tmp_path / "in.csv", None, X), "json")
    assert code == EXIT_OK, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 7
    ref = forward(SPEC, params, X)
    for obj, p in zip(lines, ref, strict=True):
        assert set(obj) == {"label", "probabilities"}
        assert list(obj["probabilities"]) == ["10", "20", "30"]
        np.testing.assert_allclose(list(obj["probabilities"].values()), p, rtol=P_RTOL, atol=P_ATOL)
        assert obj["label"] == SPEC.labels[int(np.argmax(p))]


def test_cli_streams_in_chunks(
    tmp_path: Path, deployed: tuple[Path, Params], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(predictor_mod, "_CHUNK_ROWS", 4)
    cfg, params = deployed
    X = _raw_inputs(11, seed=5)
    code, out, _ = _run_cli(
        cfg, _write_csv(tmp_path / "in.csv", list(SPEC.feature_names), X), "csv"
    )
    assert code == EXIT_OK
    table = list(csv.reader(io.StringIO(out)))
    assert table[0][0] == "label" and len(table) == 12  # one header, 11 rows
    got = np.array(table[1:], dtype=np.float64)
    np.testing.assert_allclose(got[:, 1:], forward(SPEC, params, X), rtol=P_RTOL, atol=P_ATOL)


def test_cli_wrong_feature_count(tmp_path: Path, deployed: tuple[Path, Params]) -> None:
    cfg, _ = deployed
    code, out, err = _run_cli(cfg, _write_csv(tmp_path / "in.csv", None, np.zeros((3, 5))), "csv")
    assert code == EXIT_INPUT
    assert "5 columns" in err and "4 features" in err
    assert out == ""
    code, _, err = _run_cli(
        cfg, _write_csv(tmp_path / "h.csv", ["temp", "humidity", "co2"], np.zeros((2, 3))), "json"
    )
    assert code == EXIT_INPUT
    assert "missing feature columns ['door']" in err


def test_cli_bad_values_and_ragged_rows(tmp_path: Path, deployed: tuple[Path, Params]) -> None:
    cfg, _ = deployed
    bad = tmp_path / "bad.csv"
    bad.write_text("1,2,3,4\n1,2,x,4\n")
    code, _, err = _run_cli(cfg, bad, "csv")
    assert code == EXIT_INPUT and "line 2" in err and "not a number" in err
    bad.write_text("1,2,3,4\n1,2,3\n")
    code, _, err = _run_cli(cfg, bad, "csv")
    assert code == EXIT_INPUT and "line 2" in err
    bad.write_text("temp,humidity,co2,door\n")
    code, _, err = _run_cli(cfg, bad, "csv")
    assert code == EXIT_INPUT and "no data rows" in err
    code, _, err = _run_cli(cfg, tmp_path / "missing.csv", "csv")
    assert code == EXIT_INPUT and "cannot read" in err
    code, _, err = _run_cli(cfg, bad, "xml")
    assert code == EXIT_INPUT and "format" in err


def test_cli_headerless_with_integer_label_column(tmp_path: Path, keys: Keys) -> None:
    params = _params(SPEC, 13)
    _write_onnx_msg(tmp_path / "state", keys.signer, SPEC, params, version=1)
    cfg = _agent_toml(tmp_path, label_column=-1)
    X = _raw_inputs(5, seed=6)
    rows = np.column_stack([X, np.zeros(5)])  # label last
    code, out, err = _run_cli(cfg, _write_csv(tmp_path / "in.csv", None, rows), "json")
    assert code == EXIT_OK, err
    got = [json.loads(line)["label"] for line in out.splitlines()]
    ref = forward(SPEC, params, X)
    assert got == [SPEC.labels[i] for i in ref.argmax(axis=1)]


def test_cli_regression(tmp_path: Path, keys: Keys) -> None:
    params = _params(REG_SPEC, 14)
    _write_onnx_msg(tmp_path / "state", keys.signer, REG_SPEC, params, version=2)
    cfg = _agent_toml(tmp_path)
    X = np.random.default_rng(1).normal(0, 4, (6, 3)).astype(np.float32)
    ref = forward(REG_SPEC, params, X)[:, 0]
    inp = _write_csv(tmp_path / "in.csv", None, X)
    code, out, err = _run_cli(cfg, inp, "csv")
    assert code == EXIT_OK, err
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == ["prediction"]
    np.testing.assert_allclose(np.array(table[1:], dtype=np.float64)[:, 0], ref, rtol=1e-4)
    code, out, _ = _run_cli(cfg, inp, "json")
    assert code == EXIT_OK
    got = [json.loads(line)["prediction"] for line in out.splitlines()]
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    # The model names no features: a header still works, minus the config's label column.
    rows = np.column_stack([X[:, 0], np.full(6, 1e6), X[:, 1:]])
    inp = _write_csv(tmp_path / "h.csv", ["a", "label", "b", "c"], rows)
    code, out, err = _run_cli(cfg, inp, "json")
    assert code == EXIT_OK, err
    got = [json.loads(line)["prediction"] for line in out.splitlines()]
    np.testing.assert_allclose(got, ref, rtol=1e-4)


def test_cli_without_a_model_or_config(tmp_path: Path, keys: Keys) -> None:
    cfg = _agent_toml(tmp_path)
    inp = _write_csv(tmp_path / "in.csv", None, np.zeros((1, 4)))
    code, out, err = _run_cli(cfg, inp, "csv")
    assert code == EXIT_MODEL and "no model" in err and out == ""
    code, _, err = _run_cli(tmp_path / "absent.toml", inp, "csv")
    assert code == EXIT_MODEL and "cannot read" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("[device\n")
    code, _, err = _run_cli(broken, inp, "csv")
    assert code == EXIT_MODEL and "TOML" in err
    code, _, err = _run_cli(_agent_toml(tmp_path, key=False), inp, "csv")
    assert code == EXIT_MODEL and "aggregator_public_key" in err


def test_cli_refuses_a_badly_signed_model(tmp_path: Path, keys: Keys) -> None:
    _write_onnx_msg(tmp_path / "state", Ed25519Signer.generate(), SPEC, _params(SPEC, 1), 1)
    code, out, err = _run_cli(
        _agent_toml(tmp_path), _write_csv(tmp_path / "in.csv", None, np.zeros((1, 4))), "csv"
    )
    assert code == EXIT_MODEL and "signature" in err and out == ""


def test_cli_uses_the_configured_delimiter_and_default_label_column(
    tmp_path: Path, keys: Keys
) -> None:
    """``[data] delimiter`` applies; the default label_column (-1) drops a trailing column."""
    params = _params(REG_SPEC, 15)
    _write_onnx_msg(tmp_path / "state", keys.signer, REG_SPEC, params, version=3)
    cfg = tmp_path / "semi.toml"
    cfg.write_text(
        f'[device]\nid = "dev-1"\nfederation = "{FED}"\nstate_dir = "state"\n\n'
        '[security]\naggregator_public_key = "aggregator.pub"\nupdate_key = "k.hmac"\n\n'
        '[data]\nsource = "csv"\npath = "data.csv"\ndelimiter = ";"\n'
    )
    X = np.random.default_rng(2).normal(0, 4, (4, 3)).astype(np.float32)
    inp = tmp_path / "in.csv"
    inp.write_text(
        "a;b;c;target\n" + "".join(";".join(map(repr, [*r.tolist(), 99.0])) + "\n" for r in X)
    )
    code, out, err = _run_cli(cfg, inp, "json")
    assert code == EXIT_OK, err
    got = [json.loads(line)["prediction"] for line in out.splitlines()]
    np.testing.assert_allclose(got, forward(REG_SPEC, params, X)[:, 0], rtol=1e-4)


def test_edge_agent_predict_command(tmp_path: Path, deployed: tuple[Path, Params]) -> None:
    """The documented command line, end to end in a fresh interpreter."""
    cfg, params = deployed
    X = _raw_inputs(3, seed=7)
    inp = _write_csv(tmp_path / "in.csv", list(SPEC.feature_names), X)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_agent",
            "predict",
            "--config",
            str(cfg),
            "--input",
            str(inp),
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = [json.loads(line)["label"] for line in proc.stdout.splitlines()]
    assert got == [SPEC.labels[i] for i in forward(SPEC, params, X).argmax(axis=1)]
