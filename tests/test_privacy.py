"""Differential privacy: the accountant, the calibrated Gaussian mechanism, the enforced budget,
the checkpointed release counts and the refused combinations (docs/privacy.md)."""

from __future__ import annotations

import itertools
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from prometheus_client import generate_latest
from test_aggregator_support import (
    FED,
    Federation,
    publish_all,
    service_status,
    start_service,
    wait_service_ready,
    wait_until,
)

from aggregator.checkpoint import CheckpointError, CheckpointStore, decode_state
from aggregator.engine import Engine
from aggregator.metrics import Metrics
from aggregator.statusfile import format_status
from fedmqtt import topics
from fedmqtt.errors import ConfigError
from fedmqtt.models.spec import ModelSpec
from fedmqtt.privacy import accountant
from fedmqtt.privacy.accountant import gaussian_epsilon, noise_for_target, releases_within
from fedmqtt.privacy.clip import clip_params, params_norm
from fedmqtt.privacy.config import make_privacy
from fedmqtt.privacy.mechanism import gaussian_release
from simulator.broker import Mosquitto

SPEC = ModelSpec("softmax", 6, 3)
D = SPEC.layout().size
DELTA = 1e-5

# ------------------------------------------------------------------------------ accountant

# dp-accounting's own reference (rdp_privacy_accountant_test.py,
# test_compute_epsilon_delta_gaussian):
# noise multiplier 4.530877117 gives exactly (1, 1e-6)-DP for one Gaussian release.
REF_SIGMA, REF_DELTA = 4.530877117, 1e-6


def exact_gaussian_epsilon(sigma: float, k: int, delta: float) -> float:
    """The tight ε of k Gaussian releases, written out independently of any library: they are
    one Gaussian mechanism with mu = sqrt(k)/sigma (Gaussian DP), whose exact delta(eps) is
    Balle & Wang 2018, Theorem 8; inverted by bisection."""
    mu = math.sqrt(k) / sigma

    def phi(x: float) -> float:
        return 0.5 * math.erfc(-x / math.sqrt(2))

    def exact_delta(eps: float) -> float:
        return phi(-eps / mu + mu / 2) - math.exp(eps) * phi(-eps / mu - mu / 2)

    lo, hi = 0.0, 500.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if exact_delta(mid) > delta else (lo, mid)
    return hi


def test_epsilon_matches_the_library_reference_value() -> None:
    assert gaussian_epsilon(REF_SIGMA, 1, REF_DELTA) == pytest.approx(1.0, abs=1e-4)
    # k releases at sigma*sqrt(k) cost exactly what one at sigma does: the count composes.
    for k in (4, 37, 100):
        eps = gaussian_epsilon(REF_SIGMA * math.sqrt(k), k, REF_DELTA)
        assert eps == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize(("sigma", "k"), [(1.0, 1), (1.0, 100), (5.0, 100), (20.0, 1000)])
def test_epsilon_is_a_tight_upper_bound_of_the_exact_gaussian_value(sigma: float, k: int) -> None:
    eps = gaussian_epsilon(sigma, k, DELTA)
    acc = RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(sigma), k)
    assert eps == acc.get_epsilon(DELTA)
    # RDP is an upper bound of the exact value, never below it, and close to it (< 10 %).
    exact = exact_gaussian_epsilon(sigma, k, DELTA)
    assert exact <= eps <= 1.1 * exact


def test_epsilon_never_decreases_with_releases() -> None:
    values = [gaussian_epsilon(3.0, k, DELTA) for k in range(0, 300)]
    assert values[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[-1] > values[1]


def test_target_mode_derives_the_smallest_sufficient_sigma() -> None:
    for target, releases in ((1.0, 100), (4.0, 500), (10.0, 50)):
        sigma = noise_for_target(target, DELTA, releases)
        assert gaussian_epsilon(sigma, releases, DELTA) <= target
        assert gaussian_epsilon(sigma * 0.99, releases, DELTA) > target


def test_releases_within_is_the_budget_boundary() -> None:
    n = releases_within(4.0, DELTA, 5.0)
    assert n >= 1
    assert gaussian_epsilon(4.0, n, DELTA) <= 5.0 < gaussian_epsilon(4.0, n + 1, DELTA)
    assert releases_within(0.5, DELTA, 1.0) == 0  # one release already costs more


# ------------------------------------------------------------------------------ mechanism


def test_noise_is_calibrated_to_sigma_clip_over_the_buffer_size() -> None:
    """Over many releases of a buffer of K = 4 zero rows, the released mean is pure noise with
    standard deviation σ·m·C/K per coordinate (m = 2 rows per device)."""
    rng = np.random.default_rng(1)
    sigma, clip, k, m = 1.3, 0.7, 4, 2
    samples = np.concatenate(
        [
            gaussian_release(
                np.zeros((k, 50), np.float32),
                np.ones(k),
                clip=clip,
                sigma=sigma,
                rows_per_device=m,
                denominator=k,
                rng=rng,
            )[0]
            for _ in range(2000)
        ]
    )
    expected = sigma * m * clip / k
    n = samples.size  # 100,000: the std estimate's relative standard error is 1/sqrt(2n)
    assert abs(samples.std() / expected - 1) < 5 / math.sqrt(2 * n)
    assert abs(samples.mean()) < 5 * expected / math.sqrt(n)


def test_release_clips_each_row_and_weights_without_sample_counts() -> None:
    rows = np.zeros((2, 10), np.float32)
    rows[0, 0] = 100.0  # far above the bound
    rows[1, 1] = 0.5  # within it
    out, noise = gaussian_release(
        rows,
        [1.0, 0.5],
        clip=1.0,
        sigma=0.0,
        rows_per_device=1,
        denominator=4,
        rng=np.random.default_rng(0),
    )
    assert not noise.any()
    assert out[0] == pytest.approx(1.0 / 4, rel=1e-5)  # clipped to C, divided by K = 4
    assert out[1] == pytest.approx(0.5 * 0.5 / 4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gaussian_release(
            rows, [2.0, 1.0], clip=1, sigma=1, rows_per_device=1, denominator=1, rng=None
        )


def test_device_clip_bounds_all_tensors_together() -> None:
    delta = {"W0": np.full((3, 4), 3.0, np.float32), "b0": np.full(4, 4.0, np.float32)}
    clipped, norm = clip_params(delta, 2.0)
    assert norm == pytest.approx(math.sqrt(12 * 9 + 4 * 16))
    assert params_norm(clipped) <= 2.0
    assert params_norm(clipped) == pytest.approx(2.0, rel=1e-5)
    same, _ = clip_params(delta, 100.0)
    assert same is delta


# ------------------------------------------------------------------------------ config


@pytest.fixture
def fed(tmp_path: Path) -> Federation:
    return Federation(tmp_path, SPEC, devices=("dev0", "dev1", "dev2"))


def dp_config(fed: Federation, privacy: dict[str, Any], **strategy: Any) -> Any:
    return fed.config(
        "127.0.0.1",
        1883,
        strategy={"buffer_size": 2, "max_per_device": 1, "max_staleness": 100, **strategy},
        limits={"norm_reject_factor": 0.0},
        privacy={"mode": "central", "clip": 1.0, **privacy},
    )


@pytest.mark.parametrize(
    ("strategy", "limits", "match"),
    [
        ({"robust": "median"}, {}, "median cannot be combined"),
        ({"robust": "trimmed-mean"}, {}, "trimmed-mean cannot be combined"),
        ({"robust": "clip"}, {}, "clip .* cannot be combined"),
        ({"max_per_device": 0}, {}, "max_per_device"),
        ({}, {"norm_reject_factor": 10.0}, "norm_reject_factor"),
    ],
)
def test_incompatible_combinations_are_refused_at_load(
    fed: Federation, strategy: dict[str, Any], limits: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        fed.config(
            "127.0.0.1",
            1883,
            strategy={"max_per_device": 1, **strategy},
            limits={"norm_reject_factor": 0.0, **limits},
            privacy={"mode": "central", "clip": 1.0, "noise_multiplier": 1.0},
        )


def test_privacy_options_are_checked(fed: Federation) -> None:
    with pytest.raises(ConfigError, match="clip"):
        dp_config(fed, {"clip": 0.0, "noise_multiplier": 1.0})
    with pytest.raises(ConfigError, match="either noise_multiplier"):
        dp_config(fed, {"noise_multiplier": 1.0, "target_epsilon": 2.0, "planned_releases": 9})
    with pytest.raises(ConfigError, match="planned_releases"):
        dp_config(fed, {"target_epsilon": 2.0})
    with pytest.raises(ConfigError, match="mode"):
        dp_config(fed, {"mode": "local", "noise_multiplier": 1.0})  # a device's mode
    cfg = dp_config(fed, {"target_epsilon": 3.0, "planned_releases": 40})
    p = cfg.privacy
    assert p.max_epsilon == 3.0  # the target is the budget unless another one is given
    assert gaussian_epsilon(p.noise_multiplier, 40, DELTA) <= 3.0
    assert p.max_releases is not None and p.max_releases >= 40
    assert make_privacy("off").max_releases is None


# ------------------------------------------------------------------------------ engine


def engine(fed: Federation, privacy: dict[str, Any], **strategy: Any) -> Engine:
    return Engine(dp_config(fed, privacy, **strategy), Metrics(FED), keys=None)


def send(fed: Federation, e: Engine, device: str, delta: np.ndarray[Any, Any]) -> int:
    """Process one update; returns the flush it needs (0: refused)."""
    payload = fed.update(device, delta.astype(np.float32), base_version=e.version)
    return e.process([(topics.updates(FED, device), payload)], now=0.0)[0]


def budget_of(sigma: float, releases: int) -> float:
    """A max_epsilon that allows exactly ``releases`` releases per device."""
    lo, hi = gaussian_epsilon(sigma, releases, DELTA), gaussian_epsilon(sigma, releases + 1, DELTA)
    return (lo + hi) / 2


def small(seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).normal(0, 0.01, D).astype(np.float32)


def test_budget_refuses_the_spent_device_and_leaves_the_model_unchanged(fed: Federation) -> None:
    sigma = 2.0
    e = engine(fed, {"noise_multiplier": sigma, "max_epsilon": budget_of(sigma, 2)})
    for r in range(2):
        assert send(fed, e, "dev0", small(r)) and send(fed, e, "dev1", small(10 + r))
    assert e.version == 2
    status = e.metrics.snapshot()["privacy"]
    assert status["epsilon"] == pytest.approx(gaussian_epsilon(sigma, 2, DELTA))
    assert status["worst_device_releases"] == 2 and status["devices_exhausted"] == 2
    before = e.params.copy()
    assert send(fed, e, "dev0", small(5)) == 0  # spent: refused before decoding
    assert send(fed, e, "dev1", small(6)) == 0
    assert np.array_equal(e.params, before) and len(e.strategy) == 0
    snap = e.metrics.snapshot()
    assert snap["rejected"]["privacy_budget"] == 2
    shown = format_status(e.metrics.snapshot())
    assert f"ε {status['epsilon']:.3f} at δ 1e-05" in shown and "2 device(s) spent it" in shown
    assert send(fed, e, "dev2", small(7)) > 0  # a device with budget left is still accepted
    assert snap["privacy"]["stopped"] is False
    scraped = generate_latest(e.metrics.registry).decode()
    assert f"fedmqtt_privacy_epsilon {status['epsilon']}" in scraped
    assert "fedmqtt_privacy_devices_exhausted 2.0" in scraped
    assert 'fedmqtt_updates_rejected_total{reason="privacy_budget"} 2.0' in scraped


def test_stop_policy_refuses_everyone_once_a_budget_is_spent(fed: Federation) -> None:
    sigma = 2.0
    e = engine(
        fed,
        {"noise_multiplier": sigma, "max_epsilon": budget_of(sigma, 1), "on_budget": "stop"},
    )
    assert send(fed, e, "dev0", small(0)) and send(fed, e, "dev1", small(1))
    assert e.version == 1 and e.metrics.snapshot()["privacy"]["stopped"] is True
    before = e.params.copy()
    assert send(fed, e, "dev2", small(2)) == 0  # dev2 never contributed, but training stopped
    assert np.array_equal(e.params, before)
    assert e.metrics.snapshot()["rejected"]["privacy_budget"] == 1


def test_aggregator_clips_an_unclipped_device(fed: Federation) -> None:
    """A device that ignores the plan's clip is bounded anyway: with negligible noise, one
    release of a norm-100 delta moves the model by C/K."""
    e = engine(fed, {"noise_multiplier": 1e-9, "clip": 0.5})
    before = e.params.copy()
    huge = np.zeros(D, np.float32)
    huge[0] = 100.0
    assert send(fed, e, "dev0", huge) and send(fed, e, "dev1", np.zeros(D, np.float32))
    moved = (e.params - before).astype(np.float64)
    assert np.linalg.norm(moved) == pytest.approx(0.5 / 2, rel=1e-4)


def test_fedbuff_noise_on_the_mean_is_sigma_clip_over_k(fed: Federation) -> None:
    """Through the engine: each FedBuff release of K = 2 zero updates moves the model by pure
    noise of std σ·C/K (m = 1 row per device)."""
    sigma, clip = 0.8, 0.3
    e = engine(fed, {"noise_multiplier": sigma, "clip": clip})
    steps = []
    for _ in range(150):
        before = e.params.copy()
        assert send(fed, e, "dev0", np.zeros(D, np.float32))
        assert send(fed, e, "dev1", np.zeros(D, np.float32))
        steps.append(e.params - before)
    noise = np.concatenate(steps).astype(np.float64)
    assert abs(noise.std() / (sigma * clip / 2) - 1) < 5 / math.sqrt(2 * noise.size)


def test_fedasync_noises_each_applied_update(fed: Federation) -> None:
    sigma, clip = 0.5, 0.2
    e = engine(
        fed,
        {"noise_multiplier": sigma, "clip": clip},
        name="fedasync",
        alpha=1.0,
        staleness="constant",
        device_window=1,
    )
    steps = []
    for i in range(150):
        before = e.params.copy()
        assert send(fed, e, ("dev0", "dev1", "dev2")[i % 3], np.zeros(D, np.float32))
        steps.append(e.params - before)
    noise = np.concatenate(steps).astype(np.float64)
    n = noise.size
    assert abs(noise.std() / (sigma * clip) - 1) < 5 / math.sqrt(2 * n)
    assert e.metrics.snapshot()["privacy"]["releases"] == 150


def test_checkpoint_keeps_the_release_counts(fed: Federation) -> None:
    sigma = 1.5
    e = engine(fed, {"noise_multiplier": sigma})
    for r in range(3):
        send(fed, e, "dev0", small(r))
        send(fed, e, ("dev1", "dev2")[r % 2], small(9 + r))
    state = decode_state(e.snapshot().data)
    again = engine(fed, {"noise_multiplier": sigma})
    again.restore(state)
    assert again.strategy.privacy is not None
    assert dict(again.strategy.privacy.counts) == {"dev0": 3, "dev1": 2, "dev2": 1}
    eps = again.metrics.snapshot()["privacy"]["epsilon"]
    assert eps == pytest.approx(gaussian_epsilon(sigma, 3, DELTA))
    # The accountant cannot continue with another σ: refused, not mis-accounted.
    other = engine(fed, {"noise_multiplier": sigma * 2})
    with pytest.raises(CheckpointError, match="noise_multiplier"):
        other.restore(decode_state(e.snapshot().data))


def test_target_mode_continues_with_the_checkpointed_sigma(fed: Federation) -> None:
    """With an unchanged target the σ the releases were made with is kept (a library version
    could calibrate a slightly different one); another target is refused."""
    target = {"target_epsilon": 6.0, "planned_releases": 20}
    e = engine(fed, target)
    for r in range(2):
        send(fed, e, "dev0", small(r))
        send(fed, e, "dev1", small(5 + r))
    state = decode_state(e.snapshot().data)
    saved = state["strategy"]["privacy"]
    saved["noise_multiplier"] *= 1.0001
    again = engine(fed, target)
    again.restore(state)
    assert again.strategy.privacy is not None
    assert again.strategy.privacy.sigma == saved["noise_multiplier"]
    assert again.strategy.privacy.counts["dev0"] == 2
    other = engine(fed, {"target_epsilon": 5.0, "planned_releases": 20})
    with pytest.raises(CheckpointError, match="noise_multiplier"):
        other.restore(state)


# ------------------------------------------------------------------------------ kill -9

DEVICES = ("dev0", "dev1", "dev2", "dev3")


def status_privacy(state: Path) -> dict[str, Any]:
    p = service_status(state).get("privacy")
    return dict(p) if isinstance(p, dict) else {}


def checkpoint_counts(state: Path) -> dict[str, int]:
    loaded = CheckpointStore(state / "checkpoints").load_latest()
    assert loaded is not None
    privacy = loaded.state["strategy"]["privacy"]
    return dict(privacy["counts"]) if privacy else {}


def test_kill_9_keeps_epsilon(broker: Mosquitto, tmp_path: Path) -> None:
    """A real aggregator process with central DP is killed with SIGKILL after some releases:
    the restarted one reports the ε of the release counts in its last checkpoint (never 0, never
    less), and ε keeps growing from there."""
    sigma = 3.0
    fed = Federation(tmp_path, SPEC, DEVICES)
    cfg = fed.write_toml(
        tmp_path / "aggregator.toml",
        "127.0.0.1",
        broker.port,
        strategy={"buffer_size": 2, "max_per_device": 1, "max_staleness": 1_000_000},
        limits={"norm_reject_factor": 0.0},
        privacy={"mode": "central", "clip": 1.0, "noise_multiplier": sigma},
    )
    state, log = tmp_path / "state", tmp_path / "aggregator.log"

    def updates(first: int, n: int) -> list[tuple[str, bytes]]:
        out = []
        for i in range(first, first + n):
            dev = DEVICES[i % len(DEVICES)]
            out.append((topics.updates(FED, dev), fed.update(dev, small(i), seq=i)))
        return out

    proc = start_service(cfg, log)
    try:
        wait_service_ready(state, 0)
        publish_all(broker.port, updates(0, 40))
        wait_until(lambda: status_privacy(state).get("releases", 0) >= 20, 30, "20 releases")
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        counts = checkpoint_counts(state)
        worst = max(counts.values())
        assert worst >= 5  # 40 updates of 4 devices, 2 per release: ~10 releases each
        restarted = time.time()
        proc = start_service(cfg, log)
        wait_service_ready(state, restarted)
        after = status_privacy(state)
        assert after["worst_device_releases"] >= worst
        assert after["epsilon"] >= gaussian_epsilon(sigma, worst, DELTA) > 0
        publish_all(broker.port, updates(40, 8))
        wait_until(
            lambda: status_privacy(state).get("worst_device_releases", 0) > worst + 1,
            30,
            "more releases after the restart",
        )
        assert status_privacy(state)["epsilon"] > gaussian_epsilon(sigma, worst, DELTA)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_without_the_accounting_library_the_error_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import raises ImportError
    accountant.gaussian_epsilon.cache_clear()
    with pytest.raises(ConfigError, match=r"fedmqtt\[privacy\]"):
        accountant.gaussian_epsilon(1.5, 3, 1e-5)
