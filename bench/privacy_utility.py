"""Privacy-utility of central differential privacy: accuracy and ε at δ = 1e-5 against the same
run without DP, for 100, 300 and 1,000 devices, on digits and on Synthetic(1, 1).

The path is the lightest one that is still the real code on both sides, without MQTT: every
device trains with the agent's own functions (``fedmqtt.models.train.train_local`` with the
plan's settings, then ``fedmqtt.privacy.clip.clip_params`` to the plan's ``dp_clip``, exactly
what ``edge_agent.trainer.compute_delta`` does), and every update goes through the real
aggregator engine (``aggregator.engine.Engine.process_verified``: staleness check, replay window,
rate limit, ``max_per_device``, the FedBuff buffer, the central-DP release, its accountant and
budget), which is the path the scale-out workers feed. What is not run: the broker, the agents'
MQTT clients and the update MACs (a separate check, not part of this table, is a real
``fedmqtt simulate --dp central`` run). 1,000 real agents (10 processes of 100 agent threads
plus their MQTT clients) for 30 configurations is more than two shared cores can run in a
useful time, hence this path; it is labelled as such in the results.

Protocol: FedBuff with K = N/5 and ``max_per_device`` 1; devices run asynchronously: K of them
are training at any time, each from the version that was current when it started, and they
finish in the order they started (staleness about 1, discounted by the default poly:0.5). Each
of P = 10 passes sends every device once in a fresh random order, so every device contributes
to exactly P releases and the worst-case ε is the accountant's ε for P Gaussian releases, read
from the engine's status (no amplification by sampling: the server does not sample). σ is
derived (``--dp-epsilon``-style) for target ε 1, 2, 4 and 8; the clip bound C and the local
settings were chosen on digits only; Synthetic(1, 1) (Li et al. 2020, very heterogeneous
devices, data set grows with N) is run with the same settings, untuned.

    .venv/bin/python -m bench.privacy_utility [--devices 100,300,1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, Verified
from aggregator.evaluate import Holdout, evaluate
from aggregator.metrics import Metrics
from aggregator.validate import UpdateMeta
from bench._sim import machine
from fedmqtt.models.spec import ModelSpec
from fedmqtt.models.train import TrainConfig, train_local
from fedmqtt.privacy.accountant import noise_for_target
from fedmqtt.privacy.clip import clip_params
from simulator import datasets
from simulator.partition import partition

DELTA = 1e-5
PASSES = 10  # releases per device
TARGETS = (1.0, 2.0, 4.0, 8.0)
CLIP_ONLY_SIGMA = 1e-6  # the clip-only reference row: noise far below anything that matters
CLIP = 0.5  # chosen on digits (about the median update norm there); used unchanged elsewhere
TRAIN = TrainConfig(epochs=1, lr=0.1, batch_size=16, momentum=0.0)


def _config(root: Path, spec: ModelSpec, k: int, sigma: float | None) -> AggregatorConfig:
    (root / "devices").mkdir(exist_ok=True)
    raw: dict[str, Any] = {
        "federation": {"id": "bench", "state_dir": str(root / "state")},
        "security": {"signing_key": str(root / "k"), "devices_dir": str(root / "devices")},
        "model": dict(spec.to_wire()),
        "strategy": {"buffer_size": k, "max_per_device": 1, "max_staleness": 1000},
        "limits": {"norm_reject_factor": 0.0, "device_rate": 0.0, "receive_maximum": 65535},
    }
    if sigma is not None:
        raw["privacy"] = {"mode": "central", "clip": CLIP, "noise_multiplier": sigma}
    return AggregatorConfig.from_dict(raw, base_dir=root)


def _data(name: str, n: int, seed: int) -> tuple[ModelSpec, list[Any], Holdout]:
    ds = datasets.load(name, seed=seed, n_devices=n)
    if ds.device_shards:
        shards = list(ds.device_shards)
    else:
        parts = partition(ds.y_train, n, "iid", seed=seed, min_size=1)
        shards = [(ds.X_train[p], ds.y_train[p]) for p in parts]
    spec = ModelSpec(
        "softmax",
        n_features=ds.X_train.shape[1],
        n_outputs=ds.n_classes,
        classes=tuple(range(ds.n_classes)),
        feature_offset=ds.feature_offset,
        feature_scale=ds.feature_scale,
    )
    return spec, shards, Holdout(ds.X_test, ds.y_test)


def run_one(name: str, n: int, sigma: float | None, seed: int = 0) -> dict[str, Any]:
    """One federation of ``n`` devices; ``sigma`` None: without DP (no clip, no noise)."""
    spec, shards, holdout = _data(name, n, seed)
    k = n // 5
    rng = np.random.default_rng(seed + 1)
    with tempfile.TemporaryDirectory(prefix="fedmqtt-dp-bench-") as tmp:
        engine = Engine(_config(Path(tmp), spec, k, sigma), Metrics("bench"), keys=None)
        layout = engine.layout
        cpu = 0.0
        seq = 0
        in_flight: list[tuple[int, int, Any]] = []  # (device, base version, base params)
        order = [int(i) for p in range(PASSES) for i in rng.permutation(n)]
        for step, dev in enumerate(order):
            in_flight.append((dev, engine.version, layout.unflatten(engine.params)))
            if len(in_flight) < k and step < len(order) - 1:
                continue
            for done, base_version, base in in_flight:  # they finish in start order
                X, y = shards[done]
                new, stats = train_local(spec, base, X, y, TRAIN, rng)
                delta = {key: new[key] - base[key] for key in base}
                if sigma is not None:
                    delta, _ = clip_params(delta, CLIP)  # the device applies the plan's clip
                flat = layout.flatten(delta).astype(np.float32)
                meta = UpdateMeta(
                    f"d{done}", f"u{seq}", seq, base_version, stats.num_samples, 0.0, flat.nbytes
                )
                seq += 1
                item = Verified(
                    f"d{done}", flat.nbytes, meta, float(np.linalg.norm(flat)), flat.tobytes()
                )
                t0 = time.thread_time()
                engine.process_verified([item], now=float(seq))
                cpu += time.thread_time() - t0
            in_flight.clear()
        snap = engine.metrics.snapshot()
        acc = evaluate(spec, layout, engine.params, holdout)
        privacy = snap.get("privacy") or {}
        return {
            "dataset": name,
            "devices": n,
            "buffer": k,
            "samples_per_device": round(sum(len(s[1]) for s in shards) / n, 1),
            "sigma": sigma,
            "noise_std_on_mean": None if sigma is None else sigma * CLIP / k,
            "epsilon": privacy.get("epsilon"),
            "worst_device_releases": privacy.get("worst_device_releases"),
            "versions": engine.version,
            "accepted": snap["accepted"],
            "rejected": snap["rejected"],
            "accuracy": round(acc, 4),
            "engine_cpu_us_per_update": round(cpu / max(snap["accepted"], 1) * 1e6, 1),
        }


def cpu_ratio(updates: int = 400, k: int = 20) -> dict[str, Any]:
    """Engine CPU per accepted update, DP on vs off, for a larger model (MLP 784-256-10,
    203,530 parameters) fed random deltas: the cost of clipping and noising per release."""
    spec = ModelSpec("mlp", n_features=784, n_outputs=10, hidden=(256,), classes=tuple(range(10)))
    out: dict[str, Any] = {"model": "mlp 784-256-10", "buffer": k, "updates": updates}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="fedmqtt-dp-cpu-") as tmp:
        for label, sigma in (("off", None), ("on", 1.0)):
            engine = Engine(_config(Path(tmp), spec, k, sigma), Metrics("bench"), keys=None)
            d = engine.layout.size
            deltas = [rng.normal(0, 0.01, d).astype(np.float32) for _ in range(k)]
            cpu = 0.0
            for i in range(updates):
                flat = deltas[i % k]
                meta = UpdateMeta(f"d{i % k}", f"u{i}", i, engine.version, 10, 0.0, flat.nbytes)
                item = Verified(f"d{i % k}", flat.nbytes, meta, 1.0, flat.tobytes())
                t0 = time.thread_time()
                engine.process_verified([item], now=float(i))
                cpu += time.thread_time() - t0
            out[f"engine_cpu_us_per_update_dp_{label}"] = round(cpu / updates * 1e6, 1)
            out["parameters"] = d
    out["ratio"] = round(
        out["engine_cpu_us_per_update_dp_on"] / out["engine_cpu_us_per_update_dp_off"], 2
    )
    return out


def _summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (dataset, devices, σ): accuracy mean and range over the seeds."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["dataset"], r["devices"], r["sigma"]), []).append(r)
    out = []
    for g in groups.values():
        accs = [r["accuracy"] for r in g]
        first = dict(g[0])
        first.pop("seed", None)
        first.update(
            accuracy=round(float(np.mean(accs)), 4),
            accuracy_min=min(accs),
            accuracy_max=max(accs),
            seeds=len(g),
        )
        out.append(first)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="100,300,1000")
    ap.add_argument("--datasets", default="digits,synthetic")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sigmas = {t: noise_for_target(t, DELTA, PASSES) for t in TARGETS}
    rows = []
    for name in args.datasets.split(","):
        for n in (int(v) for v in args.devices.split(",")):
            # "clip": clipped to C with negligible noise, to tell the clip's cost from the noise's.
            for (target, sigma), seed in itertools.product(
                [(None, None), ("clip", CLIP_ONLY_SIGMA), *sigmas.items()], range(args.seeds)
            ):
                r = run_one(name, n, sigma, seed)
                r["target_epsilon"] = target
                r["seed"] = seed
                rows.append(r)
                eps = "no DP" if r["epsilon"] is None else f"ε {r['epsilon']:.2f}"
                if target == "clip":
                    eps = "clip only"
                print(
                    f"{name:10s} N={n:5d} σ={sigma if sigma else 0:7.3f} {eps:10s} "
                    f"acc {r['accuracy']:.3f}  engine {r['engine_cpu_us_per_update']} µs/update",
                    flush=True,
                )
    cpu = cpu_ratio()
    print(f"engine CPU per update, DP on / off: {cpu}", flush=True)
    out = {
        "machine": machine(),
        "passes": PASSES,
        "clip": CLIP,
        "delta": DELTA,
        "table": _summarise(rows),
        "cpu": cpu,
        "rows": rows,
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
