"""Learning quality through the whole system: real broker, real aggregator, 20 real agents.

Runs of ``fedmqtt simulate`` on digits bounded by a number of global-model versions, not by
seconds: a busy machine makes a run slower, not shorter, so the gates hold the same on any
load. The full-length numbers are in docs/benchmarks.md (bench/time_to_accuracy.py,
bench/bytes_to_accuracy.py).

Quality is judged against the split's own centralized reference: the same model trained on the
pooled shards and evaluated on the same test split, computed in the same run. Splits differ
(seed 0's reference is 0.967, seed 2's 0.953) and the federated runs follow their split, so an
absolute goal would be tuned to one seed. The quality gates hold over three seeds; the attack
comparisons are against the clean run of seed 0. The default test run checks seed 0 of each
split, and seeds 1 and 2 and the plain sign-flip comparison run with ``-m slow``.

"Final accuracy" is checked as ``tail_accuracy``, the mean test accuracy over the last quarter of
the run: an asynchronous global model moves with every buffer of non-IID updates, and one
evaluation on 359 test digits moves in steps of 0.28 points, so a single last evaluation is a
coin toss within about a point of the level the model has reached.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedmqtt import wire
from fedmqtt.models import init_params
from fedmqtt.signing import Ed25519Signer
from simulator.runner import SimConfig, federation_data, run_simulation

SEEDS = (0, 1, 2)
# Seed 0 in the default run, the other seeds with the slow ones (each run is ~30 s).
GATE_SEEDS = [pytest.param(seed, marks=[pytest.mark.slow] if seed else []) for seed in SEEDS]
# FedBuff K = 10 over 20 agents: 400 versions are 4,000 updates, ~20 s on an idle 2-core
# machine. Measured gaps to the centralized reference (IID and Dirichlet 0.5, seeds 0-2): 1.0-1.2
# points at 400 versions for the three farthest, 0.1-0.3 already at 300 for the others.
VERSIONS = 400
# Dirichlet 0.1 (most devices hold two or three digits) needs about twice as many versions to
# come within 2 points on every seed (at 300 versions seed 2 was 2.5 points short): slow runs.
SKEWED_VERSIONS = 800
GAP = 0.02  # the federated model within 2 points of the centralized one
SHORT = SimConfig(
    clients=20, duration=300.0, versions=VERSIONS, compute_time=0.05, quiet=True, seed=0
)
_cache: dict[str, dict[str, Any]] = {}


def simulate(**changes: Any) -> dict[str, Any]:
    """Run (once per distinct configuration in this session) and return the summary."""
    cfg = SimConfig(**{**SHORT.__dict__, **changes})
    key = repr(cfg)
    if key not in _cache:
        _cache[key] = run_simulation(cfg, out=io.StringIO())
    return _cache[key]


def check_quality(s: dict[str, Any], versions: int) -> None:
    assert s["error"] is None, s["error"]
    assert s["versions"] >= versions, f"stopped by the {SHORT.duration:.0f} s cap: {s['versions']}"
    central = s["centralized_accuracy"]
    assert 0.94 <= central <= 0.99, central
    assert s["tail_accuracy"] >= central - GAP, (s["tail_accuracy"], central)
    assert s["final_accuracy"] >= central - GAP - 0.01, (s["final_accuracy"], central)
    # Honest agents, no outages: every update received is accepted, once, and every update an
    # agent saw acknowledged by the broker reached the aggregator (compared by update id). An
    # update that reached a buffer after the version it trained from was made, followed by the
    # device's next update in the same buffer, holds that one for the next buffer: at the end,
    # some may still be held (received, not yet applied), none refused.
    assert s["updates_rejected"] == {}, s["updates_rejected"]
    held = s["updates_held"]
    assert s["updates_accepted"] + held == s["updates_received"] >= versions * 10
    assert s["updates_observed"] + held == s["updates_received"]
    assert s["updates_lost"] == [] and s["updates_accepted_twice"] == []


@pytest.mark.parametrize("seed", GATE_SEEDS)
@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_digits_comes_within_two_points_of_centralized(partition: str, seed: int) -> None:
    check_quality(simulate(partition=partition, seed=seed), VERSIONS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_skewed_digits_comes_within_two_points_of_centralized(seed: int) -> None:
    s = simulate(partition="dirichlet:0.1", seed=seed, versions=SKEWED_VERSIONS)
    check_quality(s, SKEWED_VERSIONS)


@pytest.mark.slow  # ~75 s; the default run keeps the median against a sign-flipping flooder
def test_signflip_damage_shows_without_defence_and_median_removes_it() -> None:
    clean = simulate(partition="iid")["tail_accuracy"]
    undefended = simulate(partition="iid", attackers=0.2, attack="signflip", robust="none")
    defended = simulate(partition="iid", attackers=0.2, attack="signflip", robust="median")
    assert undefended["versions"] >= VERSIONS and defended["versions"] >= VERSIONS
    assert undefended["tail_accuracy"] < clean - 0.10, undefended
    assert defended["tail_accuracy"] >= clean - 0.03, defended
    assert len(defended["attackers"]) == 4


def test_scaling_attack_is_contained_by_clipping() -> None:
    clean = simulate(partition="iid")["tail_accuracy"]
    s = simulate(partition="iid", attackers=0.2, attack="scale", robust="clip")
    assert s["versions"] >= VERSIONS
    assert s["tail_accuracy"] >= clean - 0.03, s


def test_versions_end_the_run() -> None:
    s = run_simulation(
        SimConfig(clients=4, duration=60.0, versions=5, compute_time=0.05, quiet=True),
        out=io.StringIO(),
    )
    assert s["error"] is None
    # The run stopped at the first progress sample at or past version 5 (one sample every
    # 0.25 s; a version every few tens of milliseconds), long before the 60 s cap.
    assert 5 <= s["versions"] < 60, s["versions"]
    assert s["history"][-1]["t"] < 30


def test_summary_json_and_plot(tmp_path: Path) -> None:
    out = io.StringIO()
    cfg = SimConfig(
        clients=4,
        duration=4.0,
        compute_time=0.05,
        seed=2,
        partition="iid",
        target_accuracy=0.5,
        json=tmp_path / "s.json",
        plot=tmp_path / "s.png",
    )
    run_simulation(cfg, out=out)
    s = json.loads((tmp_path / "s.json").read_text())
    for key in (
        "final_accuracy",
        "centralized_accuracy",
        "time_to_target_s",
        "uploads_to_target",
        "bytes_uploaded",
        "updates_accepted",
        "updates_rejected",
        "versions",
    ):
        assert key in s
    assert s["time_to_target_s"] is not None and s["uploads_to_target"] > 0
    assert s["bytes_uploaded"] > 0
    # Both directions are counted: the devices received at least the plan, the spec and one
    # model each, and bytes to target add the two directions at the point the target was met.
    per_device = s["bytes_downloaded_per_device"]
    assert sorted(per_device) == [f"dev{i:04d}" for i in range(4)]
    assert all(v > 0 for v in per_device.values())
    assert (
        s["bytes_downloaded"]
        == sum(per_device.values())
        == sum(s["bytes_downloaded_by_kind"].values())
    )
    assert {"model", "plan"} <= set(s["bytes_downloaded_by_kind"])
    assert s["bytes_downloaded_to_target"] > 0
    assert s["bytes_to_target"] == s["bytes_uploaded_to_target"] + s["bytes_downloaded_to_target"]
    last = s["history"][-1]
    assert 0 < last["bytes_downloaded"] <= s["bytes_downloaded"]
    assert s["bytes_written_by_agents"] > 0
    # a model is fetched for a round, not pushed for every version
    assert 0 < s["model_fetches_by_agents"] <= s["rounds_by_agents"] + 4
    assert s["rounds_failed_by_agents"] == 0
    spec = federation_data(cfg).spec
    params = init_params(spec, np.random.default_rng(0))
    one_model = len(
        wire.encode(
            wire.GlobalModel(
                "sim",
                "aggregator",
                10**6,
                spec,
                params,
                stats={"updates": 1.0, "samples": 1.0, "staleness_mean": 1.0, "staleness_max": 1.0},
            ),
            Ed25519Signer.generate(),
        )
    )
    models = s["bytes_downloaded_by_kind"]["model"] / one_model
    # A version published while a fetch's subscription is open also arrives (until the
    # unsubscribe reaches the broker): a margin for that, far below one model per version.
    assert models <= 1.5 * (s["model_fetches_by_agents"] + 4)
    assert models < 0.75 * 4 * s["versions"]  # pushed, each device would get every version
    assert s["bytes_per_accepted_update"]["downloaded"] > 0
    assert "down" in out.getvalue()  # the progress line shows the downlink
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "version" in out.getvalue()  # the progress display ran


def test_unreached_target_is_null() -> None:
    s = run_simulation(
        SimConfig(
            clients=3,
            duration=2.0,
            compute_time=0.05,
            quiet=True,
            partition="iid",
            target_accuracy=0.999,
        ),
        out=io.StringIO(),
    )
    assert s["time_to_target_s"] is None and s["uploads_to_target"] is None


def test_one_attacker_at_20x_the_honest_rate_is_held_to_one_row_per_buffer() -> None:
    """One attacker of ten sends sign-flipped updates 20 times as often as an honest device,
    each with a fresh id, without waiting for new versions. With ``--robust median`` and the
    default ``max_per_device = 1`` it holds one row of each FedBuff buffer of five, so the
    median stays honest and the model learns: the mean accuracy over the last quarter of 100
    versions stays above 0.80. Measured on seed 0: 0.86-0.95 over eight runs (the same run
    without the attacker: 0.90-0.94, a noisy figure on this non-IID split); with
    ``max_per_device = 0`` the attacker's rows pile up in some buffers and the accuracy falls
    to 0.18-0.27, although fewer of its updates are accepted (the norm bound refuses more)."""
    s = run_simulation(
        SimConfig(
            clients=10,
            duration=120.0,
            versions=100,
            robust="median",
            quiet=True,
            seed=0,
            attackers=0.1,
            attacker_rate=20.0,
        ),
        out=io.StringIO(),
    )
    assert s["error"] is None and s["versions"] >= 100, s
    assert len(s["attackers"]) == 1
    # The attack was real: the attacker delivered several times as many updates as a typical
    # honest device (its rate is bounded by its own rounds' I/O), and its excess was refused
    # with the per-device reasons.
    by_device = s["updates_delivered_by_device"]
    [bad] = s["attackers"]
    honest = sorted(n for d, n in by_device.items() if d != bad)
    assert by_device[bad] >= 4 * honest[len(honest) // 2], by_device
    refused = s["updates_rejected"]
    per_device = ("rate_limited", "device_quota", "superseded")
    assert sum(refused.get(r, 0) for r in per_device) > 100, refused
    assert s["tail_accuracy"] >= 0.80, s
