"""FedAdagrad, FedAdam and FedYogi (fedmqtt.aggregation.serveropt): steps computed by hand,
state that continues bit for bit through a checkpoint, the hooks in FedBuff and FedAsync, and
the ``[strategy]`` options refused when wrong."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from test_aggregator_units import fill, meta

from aggregator.checkpoint import CheckpointError, decode_state, encode_state
from aggregator.config import AggregatorConfig, StrategyConfig
from aggregator.strategies import FedAsync, FedBuff, build_strategy
from fedmqtt.aggregation.serveropt import (
    DEFAULT_SERVER_LR,
    FedAdagrad,
    FedAdam,
    FedYogi,
    adaptive_optimizer,
)
from fedmqtt.errors import ConfigError
from fedmqtt.models.spec import ModelSpec

G = np.array([4.0], dtype=np.float32)
W0 = np.zeros(1, dtype=np.float32)


def two_steps(opt: Any) -> tuple[float, float]:
    """The model after one and after two steps with the pseudo-gradient 4 from 0."""
    w1 = opt.step(W0, G)
    w2 = opt.step(w1, G)
    return float(w1[0]), float(w2[0])


def test_the_three_optimizers_take_the_steps_computed_by_hand() -> None:
    """beta1 0, beta2 0, tau 3, lr 1, g = 4 twice; v starts at tau^2 = 9.

    Adagrad: v = 9 + 16 = 25 -> 4 / (5 + 3) = 0.5;  v = 25 + 16 = 41 -> + 4 / (sqrt 41 + 3).
    Adam:    v = 0 * 9 + 16 = 16 -> 4 / (4 + 3);    v = 16 again -> + 4 / 7.
    Yogi:    v = 9 - 16 * sign(9 - 16) = 25 -> 0.5; v = 25 - 16 * sign(25 - 16) = 9 -> + 4 / 6.
    """
    a1, a2 = two_steps(FedAdagrad(1.0, 0.0, 0.0, 3.0))
    assert a1 == pytest.approx(0.5) and a2 == pytest.approx(0.5 + 4 / (math.sqrt(41) + 3))
    d1, d2 = two_steps(FedAdam(1.0, 0.0, 0.0, 3.0))
    assert d1 == pytest.approx(4 / 7) and d2 == pytest.approx(8 / 7)
    y1, y2 = two_steps(FedYogi(1.0, 0.0, 0.0, 3.0))
    assert y1 == pytest.approx(0.5) and y2 == pytest.approx(0.5 + 4 / 6)


def test_first_moment_and_learning_rate() -> None:
    """beta1 0.5, beta2 0.5, tau 1, lr 0.1, g = 7: m = 3.5, v = 0.5 * 1 + 0.5 * 49 = 25,
    w = 0.1 * 3.5 / (5 + 1); then g = -7: m = 1.75 - 3.5 = -1.75, v = 12.5 + 24.5 = 37."""
    opt = FedAdam(0.1, 0.5, 0.5, 1.0)
    w1 = opt.step(W0, np.array([7.0], np.float32))
    assert float(w1[0]) == pytest.approx(0.35 / 6)
    w2 = opt.step(w1, np.array([-7.0], np.float32))
    assert float(w2[0]) == pytest.approx(0.35 / 6 - 0.175 / (math.sqrt(37) + 1))
    assert opt.steps == 2
    assert opt.m is not None and opt.v is not None
    assert float(opt.m[0]) == pytest.approx(-1.75) and float(opt.v[0]) == pytest.approx(37.0)


def test_each_coordinate_moves_by_about_lr_whatever_the_scale_of_the_delta() -> None:
    for scale in (1e-4, 1.0, 1e3):
        opt = adaptive_optimizer("adam", 0.01, 0.0, 0.0, 1e-9)
        out = opt.step(np.zeros(3, np.float32), np.array([scale, -scale, 0.0], np.float32))
        np.testing.assert_allclose(out, [0.01, -0.01, 0.0], rtol=1e-4)


def test_bad_input_leaves_the_state_unchanged() -> None:
    opt = FedYogi(0.1)
    opt.step(np.zeros(4, np.float32), np.ones(4, np.float32))
    before = opt.to_state()
    for bad in (np.array([1, np.nan, 1, 1], np.float32), np.ones(5, np.float32)):
        with pytest.raises(ValueError):
            opt.step(np.zeros(4, np.float32), bad)
    after = opt.to_state()
    assert after["steps"] == before["steps"] == 1
    np.testing.assert_array_equal(after["m"], before["m"])
    np.testing.assert_array_equal(after["v"], before["v"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "server_lr"),
        ({"beta1": 1.0}, "beta1"),
        ({"beta2": -0.1}, "beta2"),
        ({"tau": 0.0}, "tau"),
        ({"tau": math.inf}, "tau"),
    ],
)
def test_bad_hyperparameters_are_refused(kwargs: dict[str, float], message: str) -> None:
    args = {"lr": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3} | kwargs
    with pytest.raises(ValueError, match=message):
        FedAdam(**args)


SPEC = ModelSpec("softmax", 4, 3)


def strategy_config(**strategy: Any) -> StrategyConfig:
    raw = {
        "federation": {"id": "f", "state_dir": "state"},
        "security": {"signing_key": "k", "devices_dir": "d"},
        "model": dict(SPEC.to_wire()),
        "strategy": strategy,
    }
    return AggregatorConfig.from_dict(raw).strategy


def test_strategy_options_and_their_defaults() -> None:
    cfg = strategy_config(server_optimizer="adam")
    assert cfg.server_optimizer == "adam" and cfg.server_lr == DEFAULT_SERVER_LR["adam"]
    assert (cfg.beta1, cfg.beta2, cfg.tau) == (0.9, 0.99, 1e-3)
    plain = strategy_config()
    assert plain.server_optimizer == "sgd" and plain.server_lr == 1.0
    cfg = strategy_config(server_optimizer="yogi", server_lr=0.5, beta1=0.0, beta2=0.9, tau=0.1)
    assert (cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau) == (0.5, 0.0, 0.9, 0.1)


@pytest.mark.parametrize(
    ("strategy", "message"),
    [
        ({"server_optimizer": "rmsprop"}, r"\[strategy\] server_optimizer: must be one of"),
        ({"server_optimizer": "adam", "beta1": 1.0}, r"\[strategy\] beta1: must be in \[0, 1\)"),
        ({"server_optimizer": "adam", "beta2": 1.5}, r"\[strategy\] beta2: must be in \[0, 1\)"),
        ({"server_optimizer": "adam", "beta2": -0.5}, r"\[strategy\] beta2"),
        ({"server_optimizer": "adam", "tau": 0}, r"\[strategy\] tau: must be > 0"),
        ({"server_optimizer": "yogi", "server_lr": 0}, r"\[strategy\] server_lr: must be > 0"),
        ({"server_optimizer": "adam", "momentum": 0.9}, r"\[strategy\] momentum: .* beta1"),
        ({"tau": 0.1}, r"\[strategy\] tau: applies only to server_optimizer"),
        ({"server_optimizer": "adam", "tau": "big"}, r"\[strategy\] tau: must be a number"),
    ],
)
def test_bad_strategy_options_are_refused(strategy: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        strategy_config(**strategy)


@pytest.mark.parametrize("name", ["adagrad", "adam", "yogi"])
def test_fedbuff_applies_the_optimizer_and_its_checkpoint_continues_bit_for_bit(
    name: str,
) -> None:
    cfg = StrategyConfig(buffer_size=2, staleness="constant", server_optimizer=name, server_lr=0.1)
    rng = np.random.default_rng(7)
    rows = rng.normal(0, 1, (6, 12)).astype(np.float32)
    s = FedBuff(cfg, 12)
    reference = adaptive_optimizer(name, 0.1)
    w = np.zeros(12, np.float32)
    for i in range(2):  # two versions through the strategy and the optimizer alone
        fill(s, rows[2 * i : 2 * i + 2], [0, 0], [1, 3])
        mean = (rows[2 * i] + 3 * rows[2 * i + 1]) / 4
        expected = reference.step(w, mean)
        w = s.aggregate(w, None)
        s.clear()
        np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-7)
    restored = FedBuff(cfg, 12)
    restored.load_state(decode_state(encode_state({"format": 1, **{"s": s.to_state()}}))["s"])
    for strategy in (s, restored):
        fill(strategy, rows[4:], [0, 0], [1, 1])
    np.testing.assert_array_equal(restored.aggregate(w, None), s.aggregate(w, None))
    fresh = FedBuff(cfg, 12)  # without the state the step differs: the state matters
    fill(fresh, rows[4:], [0, 0], [1, 1])
    assert not np.allclose(fresh.aggregate(w, None), s.aggregate(w, None))


def test_a_changed_optimizer_starts_from_fresh_moments() -> None:
    s = FedBuff(StrategyConfig(buffer_size=1, server_optimizer="adam", server_lr=0.1), 3)
    fill(s, np.ones((1, 3), np.float32), [0], [1])
    s.aggregate(np.zeros(3, np.float32), None)
    state = s.to_state()
    yogi = FedBuff(StrategyConfig(buffer_size=1, server_optimizer="yogi", server_lr=0.1), 3)
    yogi.load_state(state)
    assert isinstance(yogi.optimizer, FedYogi) and yogi.optimizer.steps == 0
    again = FedBuff(StrategyConfig(buffer_size=1, server_optimizer="adam", server_lr=0.1), 3)
    again.load_state(state)
    assert isinstance(again.optimizer, FedAdam) and again.optimizer.steps == 1
    state["optimizer"]["v"]["data"] = np.full(3, -1, np.float32).tobytes()
    with pytest.raises(CheckpointError, match="v must be >= 0"):
        again.load_state(state)
    bigger = FedBuff(StrategyConfig(buffer_size=1, server_optimizer="adam", server_lr=0.1), 4)
    with pytest.raises(CheckpointError, match="has 3 values, the model 4"):
        bigger.load_state(s.to_state())


def test_fedasync_takes_alpha_t_times_the_delta_as_pseudo_gradient() -> None:
    cfg = StrategyConfig(
        name="fedasync", alpha=0.5, staleness="constant", server_optimizer="adam", server_lr=0.1
    )
    s = build_strategy(cfg, 3)
    assert isinstance(s, FedAsync)
    reference = adaptive_optimizer("adam", 0.1)
    w = np.ones(3, np.float32)
    delta = np.array([2.0, -1.0, 0.0], np.float32)
    for _ in range(2):
        s.slot()[:] = delta
        s.add(meta(0), 0, 1.0)
        expected = reference.step(w, 0.5 * delta)
        w = s.aggregate(w, None)
        s.clear()
        np.testing.assert_allclose(w, expected, rtol=1e-6)
    restored = build_strategy(cfg, 3)
    restored.load_state(s.to_state())
    assert isinstance(restored, FedAsync) and restored.optimizer is not None
    assert restored.optimizer.steps == 2
    plain = build_strategy(StrategyConfig(name="fedasync"), 3)
    assert "optimizer" not in plain.to_state()  # the plain mix keeps no optimizer state
