"""How few bits per value both directions can carry before rounds to target grow, and what that
leaves for everything else a message carries.

An in-process bound for the codec question on the digits softmax (650 parameters, 20 devices,
Dirichlet(0.5)): synchronous FedAvg with every client in every round --
what a FedBuff buffer of every device amounts to -- on the same spec, shards, initial model and
local training as ``bench.bytes_to_accuracy``'s baseline, with each client's delta and the
server's delta to what the clients hold rounded stochastically to the ``2L + 1`` codes
``-L..L`` (scale ``max|x| / L``, as the int8 and int4 codecs do), with error feedback on both
sides (a client keeps its rounding residual; the server sends the difference between its model
and the model the clients hold). ``L = 7`` is the int4 codec.

For each ``L`` and seed it prints the rounds to the target (one run per quantizer seed), the
tensor bytes per update at ``log2(2L + 1)`` bits per value (a lower bound: no codec packs
tighter) plus a float32 scale per tensor, each way, and what that leaves, per update, for
everything else (announcements, spec, plan, framing, signatures) if the total is to stay
``--factor`` times below the raw-float32 baseline of ``bench.bytes_to_accuracy``. No MQTT, no
agents: compare the leftover with the measured per-update overhead of the real system
(docs/benchmarks.md, "Delta downlink").

    .venv/bin/python -m bench.quantized_fedavg [--seeds 0 1 2] [--repeats 3] [--levels 7 3 2 1]
"""

from __future__ import annotations

import argparse
import math
import sys

import numpy as np

from bench._sim import machine
from bench.bytes_to_accuracy import raw_message_sizes
from fedmqtt.models import TrainConfig, build_model, init_params, train_local
from fedmqtt.params import Params
from simulator.runner import FederationData, SimConfig, federation_data


def stochastic_round(x: np.ndarray, levels: int, rng: np.random.Generator) -> np.ndarray:
    """``x`` rounded stochastically to multiples of ``max|x| / levels`` (unbiased)."""
    top = float(np.max(np.abs(x)))
    if top == 0.0:
        return np.zeros_like(x)
    scale = top / levels
    y = x / scale
    low = np.floor(y)
    q = low + (rng.random(y.shape) < (y - low))
    return (np.clip(q, -levels, levels) * scale).astype(np.float32)


def rounds_to_target(
    data: FederationData,
    cfg: SimConfig,
    levels: int | None,
    *,
    target: float,
    quantizer_seed: int,
    max_rounds: int,
) -> int | None:
    """Synchronous FedAvg rounds until the clients' model reaches ``target`` (None: not within
    ``max_rounds``); ``levels`` None sends float32 both ways."""
    spec = data.spec
    server: Params = init_params(spec, np.random.default_rng(cfg.seed))
    held = {k: v.copy() for k, v in server.items()}  # the model every client holds
    rng = np.random.default_rng(cfg.seed + 1)  # the baseline's training stream
    qrng = np.random.default_rng(quantizer_seed)
    train = TrainConfig(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, momentum=0.9)
    weights = np.array([len(X) for X, _ in data.shards], dtype=np.float64)
    weights /= weights.sum()
    residual: list[dict[str, np.ndarray]] = [{} for _ in data.shards]
    for r in range(1, max_rounds + 1):
        step = {k: np.zeros_like(v) for k, v in server.items()}
        for i, (X, y) in enumerate(data.shards):
            trained = train_local(spec, held, X, y, train, rng)[0]
            for k in server:
                d = trained[k] - held[k] + residual[i].get(k, 0.0)
                sent = d if levels is None else stochastic_round(d, levels, qrng)
                residual[i][k] = d - sent
                step[k] += weights[i] * sent
        for k in server:
            server[k] = (server[k] + step[k]).astype(np.float32)
            d = server[k] - held[k]
            sent = d if levels is None else stochastic_round(d, levels, qrng)
            held[k] = (held[k] + sent).astype(np.float32)
        if float(build_model(spec, held).score(data.X_test, data.y_test)) >= target:
            return r
    return None


def tensor_bytes(params: Params, levels: int) -> int:
    """Bytes of one direction's tensors at log2(2L + 1) bits per value, plus a float32 scale
    per tensor."""
    bits = math.log2(2 * levels + 1)
    return sum(math.ceil(v.size * bits / 8) + 4 for v in params.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--repeats", type=int, default=3, help="quantizer seeds per data seed")
    ap.add_argument("--levels", type=int, nargs="+", default=[7, 3, 2, 1])
    ap.add_argument("--target", type=float, default=0.90)
    ap.add_argument("--factor", type=float, default=5.0, help="the goal: x below the baseline")
    ap.add_argument("--max-rounds", type=int, default=60)
    args = ap.parse_args()
    if any(level < 1 for level in args.levels):
        ap.error("--levels must be >= 1")

    print(f"machine: {machine()}")
    print(
        "| seed | L (codes) | bits/value | rounds to target, per quantizer seed | "
        "tensor B per update, up + down | left per update for the rest at "
        f"{args.factor:g}x (at the median rounds) |"
    )
    print("|---|---|---:|---|---:|---:|")
    for seed in args.seeds:
        cfg = SimConfig(clients=20, partition="dirichlet:0.5", seed=seed)
        data = federation_data(cfg)
        n = len(data.shards)
        base = rounds_to_target(
            data, cfg, None, target=args.target, quantizer_seed=0, max_rounds=args.max_rounds
        )
        if base is None:
            print(f"| {seed} | baseline | 32 | not reached in {args.max_rounds} | - | - |")
            continue
        params = init_params(data.spec, np.random.default_rng(seed))
        down, up = raw_message_sizes(data.spec, params, "sim")
        budget = base * n * (down + up) / args.factor
        print(f"| {seed} | float32 (baseline) | 32 | {base} | {down} + {up} | - |")
        for levels in args.levels:
            got = [
                rounds_to_target(
                    data,
                    cfg,
                    levels,
                    target=args.target,
                    quantizer_seed=1000 + q,
                    max_rounds=args.max_rounds,
                )
                for q in range(args.repeats)
            ]
            reached = sorted(r for r in got if r is not None)
            each = tensor_bytes(params, levels)
            if len(reached) * 2 > len(got):  # the median run reached the target
                rounds = reached[(len(got) - 1) // 2]
                left = f"{budget / (rounds * n) - 2 * each:.0f}"
            else:
                left = "-"
            shown = ", ".join("-" if r is None else str(r) for r in got)
            bits = math.log2(2 * levels + 1)
            print(
                f"| {seed} | {levels} ({2 * levels + 1}) | {bits:.2f} | {shown} | "
                f"{each} + {each} | {left} |"
            )
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
