"""Bytes to accuracy in both directions, per codec, against a synchronous FedAvg baseline.

digits, 20 agents, Dirichlet(0.5), FedBuff; one simulation per codec pair ``UP/DOWN`` (the
devices' update codec, the aggregator's ``[downlink]`` model codec) or triple
``UP/DOWN/DELTA`` (also the ``[downlink] delta`` codec: versions sent as deltas from a
keyframe, ``--keyframe-every``) with the same seed, stopping when the target accuracy is first
reached. Bytes, updates and time to the target are taken where the first version reaching it
was published (sampled every 20 ms; simulator.report.Progress.first_reaching), which is what
the baseline counts: the rounds up to the one producing that model. Uploaded bytes are the
update payloads the aggregator received; downloaded bytes are every payload the devices' MQTT
clients received (model, plan, spec, announcements, ONNX), counted at the devices. Both are
MQTT payloads (our msgpack messages with their signature headers), without the MQTT packet
headers.

The baseline is synchronous FedAvg that sends raw float32 both ways, run in this process on
the same spec, shards, test split, initial model and local training plan: every round each
client downloads the full model and uploads its full update; the round count to the target is
measured, and each transfer is counted at the size of our own message carrying raw float32
tensors (a signed ``model`` body with the parameters and no spec -- an architecture is sent
once, not per round -- and a signed raw-codec ``update``).

Accuracy is the holdout accuracy of the model as the devices decode it; the table gives the
last evaluation and the mean over the last quarter of the run (a run stops at the target, so
``--no-stop`` runs every pair for the whole duration to compare accuracy at equal time).

The aggregation setting is ``--strategy`` (fedbuff, fedasync, fedavg), ``--buffer`` (FedBuff's
buffer size, FedAvg's ``min_updates``; default half the agents), ``--server-lr``,
``--server-opt``, ``--momentum``, ``--staleness``, ``--alpha`` (FedAsync), ``--deadline``
(``deadline_s``); ``--variant KEY=VALUE[,KEY=VALUE...]`` (repeatable; keys: buffer,
server_lr, server_opt, momentum, staleness, alpha, deadline, strategy) runs every codec once
more with those settings overriding the flags, so that settings are compared side by side in
one invocation. ``--epochs`` and ``--lr`` are the local training plan, of the devices and of
the baseline alike; ``--stragglers`` and ``--dropout`` make some agents 10x slower or offline
for a while (the simulator's options; the baseline is not affected).

    .venv/bin/python -m bench.bytes_to_accuracy [--target 0.90] [--duration 60]
    .venv/bin/python -m bench.bytes_to_accuracy --model mlp --hidden 1333   # ~10^5 parameters
    .venv/bin/python -m bench.bytes_to_accuracy --codecs int8/int8 --variant buffer=20
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bench._sim import fmt, machine, run
from fedmqtt import wire
from fedmqtt.codecs import Codec, encode_params
from fedmqtt.models import TrainConfig, build_model, init_params, train_local
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import Params
from fedmqtt.signing import ChaChaPolyKey, Ed25519Signer
from simulator.runner import FederationData, SimConfig, federation_data

CODECS = (
    "raw/raw",
    "fp16/fp16",
    "int8/raw",
    "int8/fp16",
    "int8/int8",
    "int8/int8+zlib",
    "topk:0.1/int8",
    "topk:0.01+zlib/int8",
    "int8/int8/int8",
    "topk:0.1/int8/topk:0.1+zlib",
)


# --variant keys: (SimConfig field or [strategy] option, parser); None values keep the default.
VARIANT_KEYS: dict[str, Any] = {
    "strategy": str,
    "buffer": int,
    "server_lr": float,
    "server_opt": str,
    "momentum": float,
    "staleness": str,
    "alpha": float,
    "deadline": float,
}


@dataclass(frozen=True)
class Setting:
    """The aggregation setting of one run (None: the simulator's / aggregator's default)."""

    strategy: str = "fedbuff"
    buffer: int | None = None
    server_lr: float | None = None
    server_opt: str | None = None
    momentum: float | None = None
    staleness: str | None = None
    alpha: float | None = None
    deadline: float | None = None  # [strategy] deadline_s

    def label(self, base: Setting | None = None) -> str:
        """``key=value`` of every field that differs from ``base`` (all set ones without)."""
        ref = base if base is not None else Setting(strategy="")
        parts = [
            f"{k}={v}" for k, v in asdict(self).items() if v is not None and v != getattr(ref, k)
        ]
        return ",".join(parts) or "defaults"

    def with_text(self, text: str) -> Setting:
        """This setting with the ``KEY=VALUE,...`` overrides of ``text`` (ValueError if bad)."""
        changes: dict[str, Any] = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not sep or key not in VARIANT_KEYS:
                raise ValueError(
                    f"--variant {text!r}: expected KEY=VALUE with KEY in {list(VARIANT_KEYS)}"
                )
            changes[key] = VARIANT_KEYS[key](value.strip())
        return replace(self, **changes)

    def apply(self, cfg: SimConfig) -> SimConfig:
        named = {
            "momentum": self.momentum,
            "staleness": self.staleness,
            "alpha": self.alpha,
            "deadline_s": self.deadline,
        }
        extra: dict[str, Any] = {k: v for k, v in named.items() if v is not None}
        return replace(
            cfg,
            strategy=self.strategy,
            buffer_size=self.buffer,
            server_lr=self.server_lr,
            server_opt=self.server_opt,
            extra_strategy=extra,
        )


@dataclass(frozen=True)
class Baseline:
    rounds: int | None  # rounds to the target (None: not reached within max_rounds)
    clients_per_round: int
    download_bytes: int  # one model transfer
    upload_bytes: int  # one update transfer
    final_accuracy: float

    @property
    def bytes_to_target(self) -> int | None:
        if self.rounds is None:
            return None
        return self.rounds * self.clients_per_round * (self.download_bytes + self.upload_bytes)


def raw_message_sizes(spec: ModelSpec, params: Params, federation: str) -> tuple[int, int]:
    """Bytes of one raw-float32 model download and one raw-float32 update upload, framed as
    our signed messages in the long wire form: fixed, so that the baseline does not move
    when our framing changes."""
    raw = Codec("raw")
    rng = np.random.default_rng(0)
    model_body = {
        "v": wire.VERSION,
        "type": "model",
        "federation": federation,
        "sender": "aggregator",
        "version": 1000,
        "stats": {},
        "created_at": time.time(),
        "params": encode_params(params, raw, rng=rng),
    }
    down = len(wire.seal(model_body, Ed25519Signer.generate(), compact=False))
    update = wire.Update(
        federation=federation,
        sender="dev0000",
        update_id="0" * 32,
        seq=1000,
        base_version=1000,
        num_samples=100,
        spec_fingerprint=spec.fingerprint(),
        delta=encode_params(params, raw, rng=rng),
        metrics={"loss": 0.5, "steps": 7.0, "train_cpu_s": 0.001},
    )
    up = len(wire.encode(update, ChaChaPolyKey.generate(), compact=False))
    return down, up


def sync_fedavg(
    data: FederationData, cfg: SimConfig, target: float, max_rounds: int = 300
) -> Baseline:
    """FedAvg with every client in every round, weighted by shard size."""
    spec = data.spec
    params = init_params(spec, np.random.default_rng(cfg.seed))
    rng = np.random.default_rng(cfg.seed + 1)
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=0.9)
    down, up = raw_message_sizes(spec, params, "sim")
    weights = np.array([len(X) for X, _ in data.shards], dtype=np.float64)
    weights /= weights.sum()
    acc = 0.0
    for r in range(1, max_rounds + 1):
        new = [train_local(spec, params, X, y, train, rng)[0] for X, y in data.shards]
        params = {
            k: np.sum([w * p[k] for w, p in zip(weights, new, strict=True)], axis=0).astype(
                np.float32
            )
            for k in params
        }
        acc = float(build_model(spec, params).score(data.X_test, data.y_test))
        if acc >= target:
            return Baseline(r, len(data.shards), down, up, acc)
    return Baseline(None, len(data.shards), down, up, acc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="softmax", choices=["softmax", "mlp"])
    ap.add_argument("--hidden", default="32", help="mlp hidden widths, comma-separated")
    ap.add_argument(
        "--codecs", default=",".join(CODECS), help="UP or UP/DOWN codec pairs, comma-separated"
    )
    ap.add_argument("--no-stop", action="store_true", help="run each pair for --duration")
    ap.add_argument("--keyframe-every", type=int, default=20, help="[downlink] keyframe_every")
    ap.add_argument("--keyframes", type=int, default=3, help="[downlink] keyframes")
    ap.add_argument(
        "--keyframe-fraction", type=float, default=0.8, help="[downlink] keyframe_fraction"
    )
    ap.add_argument("--json", type=Path, default=None, help="write every run's summary here")
    ap.add_argument("--strategy", default="fedbuff", choices=["fedbuff", "fedasync", "fedavg"])
    ap.add_argument(
        "--buffer", type=int, default=None, help="buffer_size (fedbuff) or min_updates (fedavg)"
    )
    ap.add_argument("--server-lr", type=float, default=None, help="[strategy] server_lr")
    ap.add_argument("--server-opt", default=None, help="[strategy] server_optimizer")
    ap.add_argument("--momentum", type=float, default=None, help="[strategy] momentum")
    ap.add_argument("--staleness", default=None, help="[strategy] staleness, e.g. poly:0.5")
    ap.add_argument("--alpha", type=float, default=None, help="[strategy] alpha (fedasync)")
    ap.add_argument("--deadline", type=float, default=None, help="[strategy] deadline_s")
    ap.add_argument("--stragglers", type=float, default=0.0, help="fraction of 10x slower agents")
    ap.add_argument(
        "--dropout", type=float, default=0.0, help="fraction of agents with one offline window"
    )
    ap.add_argument(
        "--variant",
        action="append",
        default=[],
        help="KEY=VALUE[,...] overriding the flags above; repeat to compare settings",
    )
    ap.add_argument("--epochs", type=int, default=1, help="local epochs (devices and baseline)")
    ap.add_argument("--lr", type=float, default=0.1, help="local lr (devices and baseline)")
    args = ap.parse_args()
    hidden = tuple(int(w) for w in args.hidden.split(","))
    base_setting = Setting(
        strategy=args.strategy,
        buffer=args.buffer,
        server_lr=args.server_lr,
        server_opt=args.server_opt,
        momentum=args.momentum,
        staleness=args.staleness,
        alpha=args.alpha,
        deadline=args.deadline,
    )
    try:
        settings = [base_setting.with_text(v) for v in args.variant] or [base_setting]
    except ValueError as e:
        ap.error(str(e))
    base_cfg = SimConfig(
        dataset="digits",
        model=args.model,
        hidden=hidden,
        partition="dirichlet:0.5",
        clients=args.clients,
        duration=args.duration,
        target_accuracy=args.target,
        stop_at_target=not args.no_stop,
        quiet=True,
        seed=args.seed,
        compute_time=0.1,
        sample_s=0.02,  # rounds take ~0.1 s: sample finer than one
        epochs=args.epochs,
        lr=args.lr,
        stragglers=args.stragglers,
        dropout=args.dropout,
    )
    data = federation_data(base_cfg)
    n_params = data.spec.layout().size
    baseline = sync_fedavg(data, base_cfg, args.target)
    print(
        f"sync FedAvg: {fmt(baseline.rounds)} rounds, {fmt(baseline.bytes_to_target)} bytes",
        file=sys.stderr,
    )
    rows: list[tuple[str, dict[str, Any]]] = []
    keyframes = {
        "keyframe_every": args.keyframe_every,
        "keyframes": args.keyframes,
        "keyframe_fraction": args.keyframe_fraction,
    }
    for pair in args.codecs.split(","):
        up, _, rest = pair.partition("/")
        down, _, delta = rest.partition("/")
        for setting in settings:
            name = pair if not args.variant else f"{pair} {setting.label(base_setting)}"
            s = run(
                replace(
                    setting.apply(base_cfg),
                    codec=up,
                    downlink_codec=down or None,
                    downlink_delta=delta or None,
                    downlink_extra=keyframes if delta else {},
                )
            )
            s["setting"] = asdict(setting)
            rows.append((name, s))
            print(
                f"{name}: {s['bytes_uploaded_to_target']} up + "
                f"{s['bytes_downloaded_to_target']} down, {s['uploads_to_target']} updates",
                file=sys.stderr,
            )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": vars(args) | {"json": str(args.json)},
                    "baseline": asdict(baseline) | {"bytes_to_target": baseline.bytes_to_target},
                    "runs": {
                        pair: {k: v for k, v in s.items() if k != "history"} for pair, s in rows
                    },
                },
                indent=1,
            )
        )
    print(f"machine: {machine()}")
    print(
        f"setting: digits {args.model} ({n_params} parameters), {args.clients} agents, "
        f"Dirichlet(0.5), {args.strategy} ({base_setting.label(Setting(args.strategy))}"
        f"{'' if args.buffer else f'; buffer {max(1, args.clients // 2)}'}), "
        f"local epochs {args.epochs} lr {args.lr}, stragglers {args.stragglers}, "
        f"dropout {args.dropout}, "
        f"target {args.target}, seed {args.seed}; baseline: synchronous FedAvg, raw float32 "
        f"both ways, all {baseline.clients_per_round} clients per round, "
        f"{baseline.download_bytes} B down + {baseline.upload_bytes} B up per client-round\n"
    )
    print(
        "| run | bytes up to target | bytes down to target | both | x below baseline |"
        " updates to target | bytes/accepted update up + down (whole run) | seconds |"
        " accuracy last / tail |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    base_total = baseline.bytes_to_target
    if baseline.rounds is not None:
        n = baseline.rounds * baseline.clients_per_round
        print(
            f"| sync FedAvg raw float32 | {n * baseline.upload_bytes} | "
            f"{n * baseline.download_bytes} | {base_total} | 1.0 | {n} | "
            f"{baseline.upload_bytes} + {baseline.download_bytes} | - | "
            f"{baseline.final_accuracy:.3f} |"
        )
    else:
        print(f"| sync FedAvg raw float32 | not reached (final {baseline.final_accuracy:.3f}) |")
    for codec, s in rows:
        total = s["bytes_to_target"]
        ratio = f"{base_total / total:.1f}" if base_total and total else "-"
        accepted = s["updates_accepted"]
        per = (
            f"{s['bytes_uploaded'] / accepted:.0f} + {s['bytes_downloaded'] / accepted:.0f}"
            if accepted
            else "-"
        )
        print(
            f"| {codec} | {fmt(s['bytes_uploaded_to_target'])} | "
            f"{fmt(s['bytes_downloaded_to_target'])} | {fmt(total)} | {ratio} | "
            f"{fmt(s['uploads_to_target'])} | {per} | {fmt(s['time_to_target_s'])} | "
            f"{fmt(s['final_accuracy'], 3)} / {fmt(s['tail_accuracy'], 3)} |"
        )
    kinds = sorted({k for _, s in rows for k in s["bytes_downloaded_by_kind"]})
    print("\nDownloaded per accepted update by kind (whole run, bytes):\n")
    print("| run | " + " | ".join(kinds) + " |")
    print("|---|" + "---:|" * len(kinds))
    for codec, s in rows:
        accepted = s["updates_accepted"] or 1
        by_kind = s["bytes_downloaded_by_kind"]
        print(
            f"| {codec} | "
            + " | ".join(f"{by_kind.get(k, 0) / accepted:.0f}" for k in kinds)
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
