"""Local differential privacy on the device (edge_agent.ldp) and ``fedmqtt simulate --dp``."""

from __future__ import annotations

import io
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from edge_agent.ldp import STATE_FILE, LocalPrivacy, SystemUniform
from fedmqtt.errors import ConfigError
from fedmqtt.privacy.accountant import gaussian_epsilon
from fedmqtt.privacy.clip import params_norm
from fedmqtt.privacy.config import make_privacy
from simulator.runner import SimConfig, run_simulation


def local(sigma: float = 1.0, clip: float = 0.5, budget: float | None = None) -> object:
    return make_privacy("local", clip=clip, noise_multiplier=sigma, max_epsilon=budget)


def test_device_noise_is_calibrated_to_the_clip_diameter(tmp_path: Path) -> None:
    """Noise std is σ·2C (the diameter of the clip ball: any other data on the device is the
    neighbour), added after clipping: a huge delta comes out as its clipped self plus noise."""
    sigma, clip = 0.8, 0.5
    ldp = LocalPrivacy(local(sigma, clip), tmp_path)  # type: ignore[arg-type]
    zero = {"W": np.zeros((200, 250), np.float32)}
    noise = ldp.privatize(zero)["W"].astype(np.float64)
    n = noise.size
    assert abs(noise.std() / (sigma * 2 * clip) - 1) < 5 / math.sqrt(2 * n)
    huge = {"W": np.full((200, 250), 10.0, np.float32)}
    out = ldp.privatize(huge)["W"].astype(np.float64)
    clipped_value = clip / math.sqrt(n)  # every coordinate equal: the clipped delta
    assert abs(out.mean() - clipped_value) < 5 * sigma * 2 * clip / math.sqrt(n)
    assert params_norm(huge) > 100 * clip


def test_device_count_is_durable_and_the_budget_refuses(tmp_path: Path) -> None:
    sigma = 2.0
    budget = (gaussian_epsilon(sigma, 3, 1e-5) + gaussian_epsilon(sigma, 4, 1e-5)) / 2
    cfg = local(sigma, budget=budget)
    ldp = LocalPrivacy(cfg, tmp_path)  # type: ignore[arg-type]
    delta = {"b": np.zeros(4, np.float32)}
    for _ in range(3):
        assert not ldp.spent()
        ldp.privatize(delta)
    assert ldp.spent()  # a fourth update would exceed max_epsilon
    saved = json.loads((tmp_path / STATE_FILE).read_text())
    assert saved["releases"] == 3
    again = LocalPrivacy(cfg, tmp_path)  # type: ignore[arg-type]
    assert again.releases == 3 and again.spent()
    assert again.epsilon() == pytest.approx(gaussian_epsilon(sigma, 3, 1e-5))
    with pytest.raises(ConfigError, match="noise_multiplier"):
        LocalPrivacy(local(sigma / 2, budget=budget), tmp_path)  # type: ignore[arg-type]


def test_system_uniform_is_uniform() -> None:
    u = SystemUniform().random(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 5 * math.sqrt(1 / 12 / u.size)


def test_simulate_with_central_dp_reports_epsilon() -> None:
    """A real federation with central DP: ε in the progress lines, the history and the JSON,
    equal to the accountant's value for the worst-case device's releases."""
    out = io.StringIO()
    sigma = 2.0
    s = run_simulation(
        SimConfig(
            clients=6,
            duration=60.0,
            versions=8,
            compute_time=0.05,
            seed=0,
            dp="central",
            dp_clip=1.0,
            dp_noise=sigma,
        ),
        out=out,
    )
    assert s["error"] is None, s["error"]
    p = s["privacy"]
    assert p["mode"] == "central" and p["releases"] >= 8
    assert p["epsilon"] == pytest.approx(gaussian_epsilon(sigma, p["worst_device_releases"], 1e-5))
    assert p["epsilon"] > 0
    eps = [h["epsilon"] for h in s["history"]]
    assert all(b >= a for a, b in itertools.pairwise(eps))
    assert "ε" in out.getvalue()
    with pytest.raises(ConfigError, match="median cannot be combined"):
        run_simulation(SimConfig(dp="central", dp_noise=1.0, robust="median", quiet=True))


@pytest.mark.slow
def test_simulate_with_local_dp_devices_stop_at_their_budget() -> None:
    """Real agents with local DP and a budget of 3 updates each: for the rest of the run they
    send nothing more, and the reported ε is within the target."""
    s = run_simulation(
        SimConfig(
            clients=4,
            duration=12.0,
            compute_time=0.05,
            seed=0,
            quiet=True,
            dp="local",
            dp_clip=0.5,
            dp_epsilon=6.0,
            dp_releases=3,
        ),
        out=io.StringIO(),
    )
    assert s["error"] is None, s["error"]
    assert s["rounds_by_agents"] == 4 * 3
    assert s["updates_received"] == 4 * 3
    assert 0 < s["privacy"]["epsilon"] <= 6.0


def test_devices_clip_to_the_plans_bound() -> None:
    """Central DP tells devices C in the plan; the trainer clips the delta to it."""
    from test_agent_helpers import digits_like, global_model

    from edge_agent.config import TrainingConfig
    from edge_agent.trainer import compute_delta, resolve_hyper
    from fedmqtt import wire
    from fedmqtt.privacy.config import PLAN_CLIP_KEY

    model = global_model(1)
    X, y = digits_like(200)
    free = resolve_hyper(None, TrainingConfig())
    assert free.clip is None
    plain = compute_delta(model, X, y, free, np.random.default_rng(0))
    assert params_norm(plain.delta) > 0.2
    plan = wire.Plan("f", "agg", 2, extra={PLAN_CLIP_KEY: 0.1})
    hyper = resolve_hyper(plan, TrainingConfig())
    clipped = compute_delta(model, X, y, hyper, np.random.default_rng(0))
    assert params_norm(clipped.delta) == pytest.approx(0.1, rel=1e-4)


def test_the_plan_carries_the_clip_and_a_change_bumps_its_revision(tmp_path: Path) -> None:
    from aggregator.publish import plan_extra, plan_revision
    from fedmqtt.wire import PlanSettings

    central = make_privacy("central", clip=0.7, noise_multiplier=1.0)
    assert plan_extra(central) == {"dp_clip": 0.7}
    assert plan_extra(make_privacy("off")) == {}
    plan = PlanSettings()
    r0 = plan_revision(tmp_path, plan)
    assert plan_revision(tmp_path, plan, plan_extra(make_privacy("off"))) == r0  # unchanged
    r1 = plan_revision(tmp_path, plan, plan_extra(central))
    assert r1 == r0 + 1
    assert plan_revision(tmp_path, plan, plan_extra(central)) == r1


def test_a_device_can_only_refuse() -> None:
    from fedmqtt.privacy.config import read_privacy
    from fedmqtt.tomltable import Table

    raw = {"mode": "local", "clip": 1.0, "noise_multiplier": 1.0, "on_budget": "stop"}
    with pytest.raises(ConfigError, match="on_budget"):
        read_privacy(Table(raw, "privacy", Path()), ("off", "local"))
    raw["on_budget"] = "refuse"
    assert read_privacy(Table(raw, "privacy", Path()), ("off", "local")).mode == "local"
