"""Learning quality through the whole system: real broker, real aggregator, 20 real agents.

Short runs (30 s) of ``fedmqtt simulate`` on digits; the full-length numbers are in
docs/benchmarks.md (bench/time_to_accuracy.py, bench/bytes_to_accuracy.py).

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

# The seed also fixes the digits train/test split. The goals assume a split whose
# centralized reference is ~0.965-0.97; seed 0's is 0.967 (seed 2's, for comparison, is 0.953,
# and the federated runs follow it down).
SHORT = SimConfig(clients=20, duration=30.0, compute_time=0.05, quiet=True, seed=0)
_cache: dict[str, dict[str, Any]] = {}


def simulate(**changes: Any) -> dict[str, Any]:
    """Run (once per distinct configuration in this session) and return the summary."""
    cfg = SimConfig(**{**SHORT.__dict__, **changes})
    key = repr(cfg)
    if key not in _cache:
        _cache[key] = run_simulation(cfg, out=io.StringIO())
    return _cache[key]


@pytest.mark.parametrize(
    ("partition", "goal"), [("iid", 0.95), ("dirichlet:0.5", 0.95), ("dirichlet:0.1", 0.90)]
)
def test_digits_reaches_quality_goal(partition: str, goal: float) -> None:
    s = simulate(partition=partition)
    assert s["error"] is None
    assert s["tail_accuracy"] >= goal, s
    assert s["final_accuracy"] >= goal - 0.015, s
    # The centralized reference is computed in the same run on the same split.
    assert 0.95 <= s["centralized_accuracy"] <= 0.99
    assert s["versions"] > 20
    # An honest device whose update reached a buffer after the version it trained from was
    # made can have its next update arrive in the same buffer: refused as device_quota.
    refused = s["updates_rejected"]
    assert set(refused) <= {"device_quota"}, refused
    assert refused.get("device_quota", 0) <= 0.03 * s["updates_received"], s
    assert s["updates_accepted"] <= s["updates_received"]


def test_signflip_damage_shows_without_defence_and_median_removes_it() -> None:
    clean = simulate(partition="iid")["tail_accuracy"]
    undefended = simulate(partition="iid", attackers=0.2, attack="signflip", robust="none")
    defended = simulate(partition="iid", attackers=0.2, attack="signflip", robust="median")
    assert undefended["tail_accuracy"] < clean - 0.10, undefended
    assert defended["tail_accuracy"] >= clean - 0.03, defended
    assert len(defended["attackers"]) == 4


def test_scaling_attack_is_contained_by_clipping() -> None:
    clean = simulate(partition="iid")["tail_accuracy"]
    s = simulate(partition="iid", attackers=0.2, attack="scale", robust="clip")
    assert s["tail_accuracy"] >= clean - 0.03, s


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
    median stays honest: after the same number of versions the accuracy stays within 3
    points of the clean run. (With ``max_per_device = 0`` it fills most of every buffer and
    the accuracy falls to about 0.27.)"""
    base = SimConfig(clients=10, duration=120.0, versions=100, robust="median", quiet=True, seed=0)
    clean = run_simulation(base, out=io.StringIO())
    attacked = run_simulation(
        SimConfig(**{**base.__dict__, "attackers": 0.1, "attacker_rate": 20.0}),
        out=io.StringIO(),
    )
    for s in (clean, attacked):
        assert s["error"] is None and s["versions"] >= 100, s
    assert len(attacked["attackers"]) == 1
    # The attack was real: one device more than doubled the traffic, and its excess was
    # refused with the per-device reasons.
    assert attacked["updates_received"] >= 1.8 * clean["updates_received"], attacked
    refused = attacked["updates_rejected"]
    assert refused.get("rate_limited", 0) + refused.get("device_quota", 0) > 100, refused
    assert attacked["tail_accuracy"] >= clean["tail_accuracy"] - 0.03, (clean, attacked)
