"""bench/quantized_fedavg.py: its rounding is unbiased and bounded, and without rounding its loop
is the raw-float32 baseline of bench/bytes_to_accuracy.py (the same rounds to target)."""

from __future__ import annotations

import numpy as np

from bench.bytes_to_accuracy import sync_fedavg
from bench.quantized_fedavg import rounds_to_target, stochastic_round, tensor_bytes
from fedmqtt.models import init_params
from simulator.runner import SimConfig, federation_data


def test_stochastic_rounding_is_unbiased_and_stays_within_its_codes() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, 200).astype(np.float32)
    scale = float(np.max(np.abs(x))) / 2
    draws = np.stack([stochastic_round(x, 2, rng) for _ in range(4000)])
    codes = draws / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert set(np.unique(np.round(codes)).tolist()) <= {-2.0, -1.0, 0.0, 1.0, 2.0}
    np.testing.assert_allclose(draws.mean(axis=0), x, atol=0.05)
    assert not stochastic_round(np.zeros(3, np.float32), 1, rng).any()


def test_unrounded_rounds_are_the_baselines() -> None:
    cfg = SimConfig(clients=20, partition="dirichlet:0.5", seed=0)
    data = federation_data(cfg)
    base = sync_fedavg(data, cfg, 0.90)
    got = rounds_to_target(data, cfg, None, target=0.90, quantizer_seed=0, max_rounds=20)
    assert base.rounds is not None and got == base.rounds


def test_tensor_bytes_at_log2_codes_plus_a_scale() -> None:
    cfg = SimConfig(clients=20, partition="dirichlet:0.5", seed=0)
    params = init_params(federation_data(cfg).spec, np.random.default_rng(0))
    # 640 weights and 10 biases: ternary 127 + 2 bytes, 15 codes 313 + 5, and 4 per scale
    assert tensor_bytes(params, 1) == 137
    assert tensor_bytes(params, 7) == 326
