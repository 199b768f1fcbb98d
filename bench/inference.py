"""On-device inference: onnxruntime (through ``edge_agent.Predictor``) vs the numpy model, same run.

For each model of the zoo at device-like sizes it measures, with one thread for both engines
(what a Raspberry-Pi-class device would give inference while the agent trains):

* single-row latency, p50 and p99 over ``--reps`` calls (labels and probabilities, or
  predictions for regression, from one call);
* batch throughput in rows per second at ``--batch`` rows per call;
* model load time (onnxruntime session creation) and the sizes of the ONNX file, of the signed
  ``OnnxModel`` message that carries it, and of the raw-codec signed ``GlobalModel``.

The numpy path is what ``SoftmaxRegression.predict_proba`` / ``predict`` run: :func:`forward`
(input checks, preprocessing, layers, softmax) plus ``labels[argmax]``. The onnxruntime path is
``Predictor.predict_with_proba`` (input checks and float32 conversion included), plus the bare
``InferenceSession.run`` to show the wrapper's share. Weights and inputs are random: speed does
not depend on their values.

Run:  .venv/bin/python bench/inference.py [--reps 5000] [--batch 1000] [--json out.json]
"""

from __future__ import annotations

import os

# One BLAS thread, set before numpy loads: the comparison is one thread against one thread.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402

from edge_agent.predictor import Predictor  # noqa: E402
from fedmqtt import wire  # noqa: E402
from fedmqtt.models import ModelSpec, forward, init_params  # noqa: E402
from fedmqtt.onnx_export import OPSET, export_onnx  # noqa: E402
from fedmqtt.params import Params  # noqa: E402
from fedmqtt.signing import Ed25519Signer  # noqa: E402


def _models() -> dict[str, ModelSpec]:
    pixels = (1.0 / 16.0,) * 64
    return {
        "softmax 64→10": ModelSpec("softmax", 64, 10, feature_scale=pixels),
        "linear 10→1": ModelSpec(
            "linear", 10, 1, feature_offset=(0.5,) * 10, feature_scale=(2.0,) * 10
        ),
        "mlp 64→32→10": ModelSpec("mlp", 64, 10, hidden=(32,), feature_scale=pixels),
        "mlp 64→64→32→10": ModelSpec("mlp", 64, 10, hidden=(64, 32), feature_scale=pixels),
        "mlp 256→128→64→10": ModelSpec("mlp", 256, 10, hidden=(128, 64)),
    }


def _params(spec: ModelSpec, rng: np.random.Generator) -> Params:
    p = init_params(spec, rng)
    return {k: (v + rng.normal(0, 0.1, v.shape)).astype(np.float32) for k, v in p.items()}


def _latencies_us(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    for _ in range(min(200, reps)):
        fn()
    t = np.empty(reps)
    clock = time.perf_counter_ns
    for i in range(reps):
        t0 = clock()
        fn()
        t[i] = clock() - t0
    p50, p99 = np.percentile(t, [50, 99]) / 1e3
    return float(p50), float(p99)


def _rows_per_s(fn: Callable[[], object], batch: int, min_s: float = 0.5) -> float:
    fn()
    n, t0 = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < min_s or n < 3:
        fn()
        n += 1
    return n * batch / elapsed


def _numpy_fn(spec: ModelSpec, params: Params, X: Any) -> Callable[[], object]:
    labels = np.asarray(spec.labels, dtype=np.int64)

    def classify() -> object:
        proba = forward(spec, params, X)
        return labels[np.argmax(proba, axis=1)], proba

    return classify if spec.is_classifier else lambda: forward(spec, params, X)


def _ort_fn(pred: Predictor, X: Any) -> Callable[[], object]:
    if pred.is_classifier:
        return lambda: pred.predict_with_proba(X)
    return lambda: pred.predict(X)


def _raw_fn(sess: Any, X: Any) -> Callable[[], object]:
    feeds = {"features": np.ascontiguousarray(X, dtype=np.float32)}
    return lambda: sess.run(None, feeds)


def run(reps: int, batch: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    signer = Ed25519Signer.generate()
    results: list[dict[str, Any]] = []
    for name, spec in _models().items():
        params = _params(spec, rng)
        onnx_bytes = export_onnx(spec, params, federation="bench", version=1, created_at=0.0)
        onnx_msg = wire.encode(wire.OnnxModel("bench", "agg", 1, onnx_bytes, 0.0), signer)
        global_msg = wire.encode(wire.GlobalModel("bench", "agg", 1, spec, params), signer)
        t0 = time.perf_counter()
        pred = Predictor.from_bytes(onnx_bytes, intra_op_num_threads=1)
        load_ms = (time.perf_counter() - t0) * 1e3
        sess = pred._session  # the bare session, to separate the wrapper's overhead
        x1 = rng.normal(0, 4, (1, spec.n_features)).astype(np.float32)
        xb = rng.normal(0, 4, (batch, spec.n_features)).astype(np.float32)
        row: dict[str, Any] = {
            "model": name,
            "params": spec.layout().size,
            "onnx_bytes": len(onnx_bytes),
            "signed_onnx_msg_bytes": len(onnx_msg),
            "signed_global_model_bytes": len(global_msg),
            "ort_load_ms": load_ms,
            "engines": {},
        }
        engines: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "numpy": (_numpy_fn(spec, params, x1), _numpy_fn(spec, params, xb)),
            "onnxruntime (Predictor)": (_ort_fn(pred, x1), _ort_fn(pred, xb)),
            "onnxruntime (bare session.run)": (_raw_fn(sess, x1), _raw_fn(sess, xb)),
        }
        for engine, (one_row, many_rows) in engines.items():
            p50, p99 = _latencies_us(one_row, reps)
            row["engines"][engine] = {
                "p50_us": p50,
                "p99_us": p99,
                "batch_rows_per_s": _rows_per_s(many_rows, batch),
            }
        results.append(row)
    return {
        "machine": {
            "cpu": _cpu_name(),
            "cores": os.cpu_count(),
            "arch": platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__,
            "opset": OPSET,
            "threads": 1,
        },
        "reps": reps,
        "batch": batch,
        "results": results,
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def to_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']} ({m['cores']} cores, {m['arch']}), Python {m['python']}, "
        f"numpy {m['numpy']}, onnxruntime {m['onnxruntime']}, opset {m['opset']}, "
        f"1 thread per engine; {report['reps']} single-row calls, batches of {report['batch']}",
        "",
        "| model | engine | 1 row p50 µs | 1 row p99 µs | batch rows/s |",
        "|---|---|---:|---:|---:|",
    ]
    for r in report["results"]:
        for engine, e in r["engines"].items():
            lines.append(
                f"| {r['model']} | {engine} | {e['p50_us']:.1f} | {e['p99_us']:.1f} | "
                f"{e['batch_rows_per_s']:,.0f} |"
            )
    lines += [
        "",
        "| model | parameters | ONNX file bytes | signed ONNX message bytes | "
        "signed global model (raw) bytes | onnxruntime load ms |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in report["results"]:
        lines.append(
            f"| {r['model']} | {r['params']:,} | {r['onnx_bytes']:,} | "
            f"{r['signed_onnx_msg_bytes']:,} | {r['signed_global_model_bytes']:,} | "
            f"{r['ort_load_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5000, help="single-row calls per engine")
    ap.add_argument("--batch", type=int, default=1000, help="rows per call for throughput")
    ap.add_argument("--json", help="also write the raw numbers to this file")
    args = ap.parse_args()
    report = run(args.reps, args.batch)
    print(to_markdown(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
