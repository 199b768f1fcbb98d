"""On-device inference with onnxruntime on the last verified global model.

The agent stores every model it accepts exactly as received (signed) in its state directory:
``model.onnx.bin`` (a :class:`fedmqtt.wire.OnnxModel`) and ``global_model.bin`` (a
:class:`fedmqtt.wire.GlobalModel`, whose spec is the ``spec-<fingerprint>.bin`` next to it).
Inference re-verifies what it loads against the pinned aggregator key instead of trusting the
file, so a file altered on disk (or copied from elsewhere) is refused rather than executed; and
because the files survive reboots, inference works offline.

Which model: the newest verified version. The aggregator may publish ONNX only every N
versions (``[onnx] every``), so when ``global_model.bin`` is newer than ``model.onnx.bin`` (or
the latter is missing) the global model is exported on the fly with
:func:`fedmqtt.onnx_export.export_onnx`; the two are computed by the same graph builder, so the
result is the graph the aggregator would have published. On equal versions the published
export wins (no ``onnx`` package needed, no export cost).

onnxruntime is an optional extra (``pip install 'fedmqtt[onnx]'``) imported only here, only when
a model is loaded. Sessions are tuned for a small device: one intra-op thread by default,
sequential execution, no spinning worker threads.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TextIO, cast

import numpy as np
import numpy.typing as npt

from edge_agent.config import DataConfig
from edge_agent.keyframe import load_newest
from edge_agent.state import stored_specs
from fedmqtt import wire
from fedmqtt.errors import ConfigError, DecodeError, FedMQTTError
from fedmqtt.signing import Ed25519Verifier

if TYPE_CHECKING:
    from edge_agent.personal import PersonalModel

__all__ = [
    "EXIT_INPUT",
    "EXIT_MODEL",
    "EXIT_OK",
    "GLOBAL_MODEL_FILE",
    "ONNX_MODEL_FILE",
    "Predictor",
    "PredictorError",
    "predict_cli",
]

ONNX_MODEL_FILE: Final = "model.onnx.bin"
GLOBAL_MODEL_FILE: Final = "global_model.bin"
INSTALL_HINT: Final = "pip install 'fedmqtt[onnx]'"

EXIT_OK: Final = 0
EXIT_INPUT: Final = 1  # the input file is unreadable or does not fit the model
EXIT_MODEL: Final = 2  # no usable model: config, missing/unverifiable files, no onnxruntime

_CHUNK_ROWS: Final = 4096
_META = "fedmqtt."

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]


class PredictorError(FedMQTTError):
    """No usable model (missing, unverifiable, malformed) or input that does not fit it."""


def _ort() -> Any:
    try:
        import onnxruntime  # optional extra: loaded only to run a model
    except ImportError:
        raise PredictorError(
            f"on-device inference needs onnxruntime, which is not installed; run: {INSTALL_HINT}"
        ) from None
    return onnxruntime


def _session(onnx_bytes: bytes, intra_op_num_threads: int) -> Any:
    ort = _ort()
    if intra_op_num_threads < 1:
        raise ValueError("intra_op_num_threads must be >= 1")
    so = ort.SessionOptions()
    so.intra_op_num_threads = intra_op_num_threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Worker threads that busy-wait for work burn a small device's CPU (and battery).
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise PredictorError(f"onnxruntime cannot load the model: {e}") from None


class Predictor:
    """A loaded ONNX model from :mod:`fedmqtt.onnx_export` and its metadata."""

    version: int
    classes: list[int] | None
    n_features: int
    n_outputs: int
    kind: str
    federation: str
    feature_names: list[str]
    metadata: dict[str, str]
    personal: str | None = None  # the personalisation mode if this is the personal model

    def __init__(self, session: Any, *, version: int | None = None) -> None:
        """Wrap an onnxruntime session; use :meth:`from_bytes` or :meth:`from_state_dir`."""
        self._session = session
        meta = session.get_modelmeta()
        self.metadata = dict(meta.custom_metadata_map)
        try:
            self.kind = self.metadata[_META + "kind"]
            self.n_features = int(self.metadata[_META + "n_features"])
            self.federation = self.metadata.get(_META + "federation", "")
            names = json.loads(self.metadata.get(_META + "feature_names", "[]"))
            classes = json.loads(self.metadata.get(_META + "classes", "null"))
            meta_version = int(self.metadata.get(_META + "version", meta.version))
        except (KeyError, ValueError) as e:
            raise PredictorError(f"model metadata is missing or malformed: {e}") from None
        if self.kind not in ("softmax", "linear", "mlp", "autoencoder"):
            raise PredictorError(f"unknown model kind {self.kind!r} in the model metadata")
        self.feature_names = [str(n) for n in names]
        self.classes = None if classes is None else [int(c) for c in classes]
        if version is not None and version != meta_version:
            raise PredictorError(
                f"the signed message says version {version}, the model inside says {meta_version}"
            )
        self.version = meta_version
        inputs = session.get_inputs()
        outputs = {o.name for o in session.get_outputs()}
        if len(inputs) != 1 or inputs[0].name != "features":
            raise PredictorError("the model must have exactly one input named 'features'")
        self.threshold: float | None = None
        self.quantile: float | None = None
        if self.is_classifier:
            if not {"label", "probabilities"} <= outputs or self.classes is None:
                raise PredictorError("a classifier model needs 'label' and 'probabilities'")
            self.n_outputs = len(self.classes)
        elif self.is_autoencoder:
            if not {"score", "decision"} <= outputs:
                raise PredictorError("an autoencoder model needs 'score' and 'decision'")
            try:
                t = json.loads(self.metadata.get(_META + "threshold", "null"))
                self.threshold = None if t is None else float(t)
                self.quantile = float(self.metadata[_META + "quantile"])
            except (KeyError, ValueError, TypeError) as e:
                raise PredictorError(f"autoencoder metadata is malformed: {e}") from None
            self.n_outputs = self.n_features
        else:
            if "prediction" not in outputs:
                raise PredictorError("a regression model needs a 'prediction' output")
            try:
                self.n_outputs = int(self.metadata[_META + "n_outputs"])
            except (KeyError, ValueError):
                raise PredictorError("model metadata lacks fedmqtt.n_outputs") from None

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_bytes(
        cls, onnx_bytes: bytes, *, intra_op_num_threads: int = 1, version: int | None = None
    ) -> Predictor:
        """Load a serialized ONNX model (already trusted: no signature check here)."""
        return cls(_session(onnx_bytes, intra_op_num_threads), version=version)

    @classmethod
    def from_state_dir(
        cls,
        state_dir: Path,
        aggregator_key: Path,
        *,
        federation: str | None = None,
        intra_op_num_threads: int = 1,
        personal_device: str | None = None,
    ) -> Predictor:
        """The newest verified model in an agent state directory (see the module docstring).

        With ``personal_device`` (the agent personalises: ``[personalise] mode`` is not off),
        that device's personal model comes first if there is one: unsigned, it must pass the
        trust rule of :mod:`edge_agent.personal`, and a file that fails it is refused.

        ``aggregator_key`` is the pinned Ed25519 public key (hex). Every file found is verified;
        one that fails verification raises :class:`PredictorError` rather than being skipped,
        because a tampered state directory is something an operator must hear about. With
        ``federation``, a model of another federation is refused too.
        """
        try:
            verifier = Ed25519Verifier.load(Path(aggregator_key))
        except ConfigError as e:
            raise PredictorError(f"cannot load the aggregator public key: {e}") from None
        state_dir = Path(state_dir)
        specs = stored_specs(state_dir, verifier, federation)
        if personal_device is not None:
            pred = cls._personal(
                state_dir, personal_device, federation or "", specs, intra_op_num_threads
            )
            if pred is not None:
                return pred
        onnx_msg = _load_signed(state_dir / ONNX_MODEL_FILE, wire.OnnxModel, verifier, federation)
        global_msg = _load_signed(
            state_dir / GLOBAL_MODEL_FILE, wire.GlobalModel, verifier, federation, specs
        )
        rebuilt = load_newest(state_dir, verifier, specs, federation)  # keyframe and delta
        if rebuilt is not None and (global_msg is None or rebuilt.version > global_msg.version):
            global_msg = rebuilt
        if onnx_msg is None and global_msg is None:
            raise PredictorError(
                f"no model in {state_dir}: neither {ONNX_MODEL_FILE} nor {GLOBAL_MODEL_FILE} "
                "exists yet; run the agent until it has received a global model"
            )
        if onnx_msg is not None and (global_msg is None or onnx_msg.version >= global_msg.version):
            return cls.from_bytes(
                onnx_msg.onnx, intra_op_num_threads=intra_op_num_threads, version=onnx_msg.version
            )
        assert global_msg is not None
        onnx_bytes = _export(global_msg, f"the global model v{global_msg.version}")
        return cls.from_bytes(
            onnx_bytes, intra_op_num_threads=intra_op_num_threads, version=global_msg.version
        )

    @classmethod
    def _personal(
        cls, state_dir: Path, device: str, federation: str, specs: wire.SpecStore, threads: int
    ) -> Predictor | None:
        """This device's personal model under the trust rule of :mod:`edge_agent.personal`
        (None if there is none yet; PredictorError if the file there fails the rule)."""
        from edge_agent.personal import PersonalModelError, load_trusted

        try:
            pm = load_trusted(state_dir, device, federation, specs)
        except (OSError, PersonalModelError) as e:
            raise PredictorError(f"the personal model was refused: {e}") from None
        if pm is None:
            return None
        onnx_bytes = pm.onnx if pm.onnx is not None else _export(pm, "the personal model")
        pred = cls.from_bytes(onnx_bytes, intra_op_num_threads=threads, version=pm.version)
        pred.personal = pm.mode
        return pred

    # ---- inference -------------------------------------------------------------------------
    @property
    def is_classifier(self) -> bool:
        return self.kind in ("softmax", "mlp")

    @property
    def is_autoencoder(self) -> bool:
        return self.kind == "autoencoder"

    def _features(self, X: npt.ArrayLike) -> F32:
        arr = np.asarray(X)
        if arr.ndim == 1:
            arr = arr.reshape(1, -1)
        if arr.ndim != 2 or arr.shape[1] != self.n_features:
            raise PredictorError(
                f"the model takes {self.n_features} features per row, got shape {arr.shape}"
            )
        if arr.dtype.kind not in "biuf":
            raise PredictorError(f"features must be numeric, got dtype {arr.dtype}")
        return np.ascontiguousarray(arr, dtype=np.float32)

    def _run(self, names: Sequence[str], X: npt.ArrayLike) -> list[Any]:
        return cast(list[Any], self._session.run(list(names), {"features": self._features(X)}))

    def predict(self, X: npt.ArrayLike) -> npt.NDArray[Any]:
        """Class labels (int64, ``(n,)``), predictions (float32, ``(n,)`` for one output) or,
        for an autoencoder, decisions (int64 ``(n,)``, 1 = anomaly).

        A 1-D ``X`` is one row.
        """
        if self.is_classifier:
            return cast(I64, self._run(["label"], X)[0])
        if self.is_autoencoder:
            return cast(I64, self._run(["decision"], X)[0])
        out = cast(F32, self._run(["prediction"], X)[0])
        return out[:, 0] if out.shape[1] == 1 else out

    def predict_proba(self, X: npt.ArrayLike) -> F32:
        """Class probabilities ``(n, n_classes)``, columns in :attr:`classes` order."""
        if not self.is_classifier:
            raise PredictorError("a regression model has no class probabilities")
        return cast(F32, self._run(["probabilities"], X)[0])

    def score_with_decision(self, X: npt.ArrayLike) -> tuple[F32, I64]:
        """An autoencoder's anomaly scores and 0/1 decisions, from one run of the graph."""
        if not self.is_autoencoder:
            raise PredictorError(f"a {self.kind} model has no anomaly score")
        score, decision = self._run(["score", "decision"], X)
        return cast(F32, score), cast(I64, decision)

    def predict_with_proba(self, X: npt.ArrayLike) -> tuple[I64, F32]:
        """Labels and probabilities from one run of the graph."""
        if not self.is_classifier:
            raise PredictorError("a regression model has no class probabilities")
        labels, proba = self._run(["label", "probabilities"], X)
        return cast(I64, labels), cast(F32, proba)


def _export(model: wire.GlobalModel | PersonalModel, what: str) -> bytes:
    """ONNX bytes of a model exported on the device (needs the onnx package)."""
    try:
        from fedmqtt.onnx_export import export_onnx  # needs the onnx package
    except ImportError:
        raise PredictorError(
            f"exporting {what} to ONNX on the device needs the onnx package; run: {INSTALL_HINT}"
        ) from None
    try:
        return export_onnx(
            model.spec,
            model.params,
            federation=model.federation,
            version=model.version,
            created_at=model.created_at,
            threshold=getattr(model, "threshold", None),  # autoencoders' global threshold
        )
    except ValueError as e:
        raise PredictorError(f"cannot export {what}: {e}") from None


def _load_signed(
    path: Path,
    cls: Any,
    verifier: Any,
    federation: str | None,
    specs: wire.SpecStore | None = None,
) -> Any:
    try:
        payload = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise PredictorError(f"cannot read {path}: {e.strerror}") from None
    try:
        msg = wire.decode(payload, cls, verifier, specs=specs)
    except DecodeError as e:
        hint = " (not signed by the pinned aggregator key)" if e.reason == "signature" else ""
        raise PredictorError(f"{path} was refused: {e}{hint}") from None
    if federation is not None and msg.federation != federation:
        raise PredictorError(
            f"{path} belongs to federation {msg.federation!r}, this device to {federation!r}"
        )
    return msg


# ---------------------------------------------------------------------------- the CLI


@dataclass(frozen=True)
class _AgentPaths:
    state_dir: Path
    aggregator_key: Path
    federation: str
    label_column: str | int
    delimiter: str
    personal_device: str | None
    data: DataConfig


def _read_agent_config(config_path: Path) -> _AgentPaths:
    """The agent.toml keys inference needs, read (and validated) by the agent's own loader."""
    from edge_agent.config import load_config

    cfg = load_config(config_path)
    return _AgentPaths(
        state_dir=cfg.device.state_dir,
        aggregator_key=cfg.security.aggregator_public_key,
        federation=cfg.device.federation,
        label_column=cfg.data.label_column,
        delimiter=cfg.data.delimiter,
        personal_device=cfg.device.id if cfg.personalise.mode != "off" else None,
        data=cfg.data,
    )


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


def _column_selection(
    header: list[str] | None, n_cols: int, pred: Predictor, label_column: str | int | None
) -> list[int]:
    """Which input columns, in which order, make the model's features.

    A header naming every model feature selects and orders by name. Otherwise the columns are
    the features in model order, minus the training label column if there is exactly one
    column too many: by name when ``label_column`` is a name and the file has a header, by
    position when it is an integer index (the agent's default, -1, is the last column).
    """
    n = pred.n_features
    names = [h.strip() for h in header] if header is not None else None
    if names is not None and pred.feature_names and set(pred.feature_names) <= set(names):
        return [names.index(f) for f in pred.feature_names]
    if n_cols == n:
        return list(range(n_cols))
    if n_cols == n + 1:
        if isinstance(label_column, str) and names is not None and label_column in names:
            drop = names.index(label_column)
            return [i for i in range(n_cols) if i != drop]
        if isinstance(label_column, int) and -n_cols <= label_column < n_cols:
            drop = label_column % n_cols
            return [i for i in range(n_cols) if i != drop]
    missing = [f for f in pred.feature_names if names is not None and f not in names]
    detail = f"; missing feature columns {missing[:5]}" if missing else ""
    hint = "" if names is not None else " (add a header row naming the columns)"
    raise PredictorError(
        f"the input has {n_cols} columns, the model takes {n} features{detail}{hint}"
    )


def _read_chunks(
    f: TextIO, pred: Predictor, label_column: str | int | None, delimiter: str = ","
) -> Iterator[F32]:
    """Float32 blocks of at most ``_CHUNK_ROWS`` rows, so big files stream in bounded memory."""
    reader = csv.reader(f, delimiter=delimiter)
    cols: list[int] | None = None
    n_cols = 0
    block: list[list[float]] = []
    for row in reader:
        if not row or all(not c.strip() for c in row):
            continue
        if cols is None:
            header = None if all(_is_number(c) for c in row) else row
            n_cols = len(row)
            cols = _column_selection(header, n_cols, pred, label_column)
            if header is not None:
                continue
        if len(row) != n_cols:
            raise PredictorError(
                f"line {reader.line_num}: {len(row)} columns, the first row had {n_cols}"
            )
        try:
            block.append([float(row[i]) for i in cols])
        except ValueError:
            raise PredictorError(f"line {reader.line_num}: a feature is not a number") from None
        if len(block) == _CHUNK_ROWS:
            yield np.asarray(block, dtype=np.float32)
            block = []
    if block:
        yield np.asarray(block, dtype=np.float32)


def _num(x: Any) -> float:
    """A float32 value as the shortest decimal that reads back to the same float32."""
    return float(str(np.float32(x)))


def _write_anomaly(
    pred: Predictor, X: F32, fmt: str, buf: io.StringIO, first: bool, *, threshold: float | None
) -> None:
    """``score,decision`` rows; ``threshold`` (the local one) replaces the model's."""
    score, decision = pred.score_with_decision(X)
    if threshold is not None:
        decision = (score > np.float32(threshold)).astype(np.int64)
    if fmt == "csv":
        w = csv.writer(buf, lineterminator="\n")
        if first:
            w.writerow(["score", "decision"])
        for v, d in zip(score, decision.tolist(), strict=True):
            w.writerow([str(np.float32(v)), d])
    else:
        for v, d in zip(score, decision.tolist(), strict=True):
            buf.write(json.dumps({"score": _num(v), "decision": d}) + "\n")


def local_threshold(pred: Predictor, data: DataConfig) -> float:
    """This device's own threshold: the model's quantile of the scores of its local data
    under the same model (computed here; nothing is stored or sent)."""
    from edge_agent.data import DataError, load_data
    from fedmqtt.models.anomaly import score_quantile

    if not pred.is_autoencoder or pred.quantile is None:
        raise PredictorError("a local threshold applies to autoencoder models only")
    try:
        X, _ = load_data(data)
        scores, _ = pred.score_with_decision(X)
        return score_quantile(scores, pred.quantile)
    except (DataError, ValueError) as e:
        raise PredictorError(f"cannot compute the local threshold from [data]: {e}") from None


def _write_chunk(
    pred: Predictor,
    X: F32,
    fmt: str,
    out: TextIO,
    first: bool,
    *,
    threshold: float | None = None,
) -> None:
    buf = io.StringIO()
    if pred.is_autoencoder:
        _write_anomaly(pred, X, fmt, buf, first, threshold=threshold)
    elif pred.is_classifier:
        assert pred.classes is not None
        labels, proba = pred.predict_with_proba(X)
        cls_names = [str(c) for c in pred.classes]
        if fmt == "csv":
            w = csv.writer(buf, lineterminator="\n")
            if first:
                w.writerow(["label", *(f"p_{c}" for c in cls_names)])
            for lab, p in zip(labels.tolist(), proba, strict=True):
                w.writerow([lab, *(str(np.float32(v)) for v in p)])
        else:
            for lab, p in zip(labels.tolist(), proba, strict=True):
                probs = {c: _num(v) for c, v in zip(cls_names, p, strict=True)}
                buf.write(json.dumps({"label": lab, "probabilities": probs}) + "\n")
    else:
        y = pred.predict(X).reshape(X.shape[0], -1)
        k = y.shape[1]
        if fmt == "csv":
            w = csv.writer(buf, lineterminator="\n")
            if first:
                w.writerow(["prediction"] if k == 1 else [f"prediction_{j}" for j in range(k)])
            for r in y:
                w.writerow([str(np.float32(v)) for v in r])
        else:
            for r in y:
                val: Any = _num(r[0]) if k == 1 else [_num(v) for v in r]
                buf.write(json.dumps({"prediction": val}) + "\n")
    out.write(buf.getvalue())


def predict_cli(
    config_path: Path,
    input_path: Path,
    output_format: str,
    out: TextIO,
    *,
    err: TextIO | None = None,
    intra_op_num_threads: int = 1,
    threshold: str = "global",
) -> int:
    """``edge-agent predict``: CSV rows in, one prediction per row out; returns the exit code.

    Input: numeric CSV (the delimiter of the config's ``[data]`` table), header row optional
    and detected (a first row with a non-numeric cell). With a header that names every feature
    of the model (``fedmqtt.feature_names``), columns are picked and ordered by name;
    otherwise the columns are the features in model order, and one extra column is dropped as
    the training label (``[data] label_column``: by name, or by index such as -1).

    Output ``csv``: ``label,p_<class>...`` for classifiers (``prediction`` for regression);
    ``json``: one object per line, ``{"label": 3, "probabilities": {"0": 0.01, ...}}`` or
    ``{"prediction": 1.5}``. An autoencoder prints ``score,decision`` (``{"score": 0.31,
    "decision": 0}``): the anomaly score and 1 if it exceeds the threshold, the federated one
    of the model (``threshold="global"``) or, with ``threshold="local"``, this device's own
    (:func:`local_threshold`). Exit codes: 0 success, 1 bad input, 2 no usable model or config.
    """
    err = sys.stderr if err is None else err
    if output_format not in ("csv", "json"):
        print(f"error: unknown output format {output_format!r}; use csv or json", file=err)
        return EXIT_INPUT
    try:
        paths = _read_agent_config(Path(config_path))
        pred = Predictor.from_state_dir(
            paths.state_dir,
            paths.aggregator_key,
            federation=paths.federation,
            intra_op_num_threads=intra_op_num_threads,
            personal_device=paths.personal_device,
        )
    except (ConfigError, PredictorError) as e:
        print(f"error: {e}", file=err)
        return EXIT_MODEL
    local: float | None = None
    if threshold not in ("global", "local"):
        print(f"error: unknown threshold {threshold!r}; use global or local", file=err)
        return EXIT_INPUT
    if threshold == "local":
        try:
            local = local_threshold(pred, paths.data)
        except PredictorError as e:
            print(f"error: {e}", file=err)
            return EXIT_INPUT
    elif pred.is_autoencoder and pred.threshold is None:
        print(
            f"warning: model version {pred.version} has no threshold yet (no device has "
            "reported a score quantile): every decision is 0",
            file=err,
        )
    n_rows = 0
    try:
        with open(input_path, encoding="utf-8", newline="") as f:
            for i, X in enumerate(_read_chunks(f, pred, paths.label_column, paths.delimiter)):
                _write_chunk(pred, X, output_format, out, first=i == 0, threshold=local)
                n_rows += X.shape[0]
    except OSError as e:
        print(f"error: cannot read {input_path}: {e.strerror}", file=err)
        return EXIT_INPUT
    except UnicodeDecodeError:
        print(f"error: {input_path} is not UTF-8 text", file=err)
        return EXIT_INPUT
    except (PredictorError, csv.Error) as e:
        print(f"error: {input_path}: {e}", file=err)
        return EXIT_INPUT
    if n_rows == 0:
        print(f"error: {input_path} has no data rows", file=err)
        return EXIT_INPUT
    which = f"personal model ({pred.personal}) from version" if pred.personal else "model version"
    used = local if local is not None else pred.threshold
    detail = "" if not pred.is_autoencoder else f", {threshold} threshold {used}"
    print(
        f"{n_rows} rows predicted with {which} {pred.version} "
        f"({pred.kind}, federation {pred.federation!r}{detail})",
        file=err,
    )
    return EXIT_OK
