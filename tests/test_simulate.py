"""Learning quality through the whole system: real broker, real aggregator, 20 real agents.

Runs of ``fedmqtt simulate`` on digits bounded by a number of global-model versions, not by
seconds: a busy machine makes a run slower, not shorter, so the gates hold the same on any
load. The full-length numbers are in docs/benchmarks.md (bench/time_to_accuracy.py,
bench/bytes_to_accuracy.py).

Quality is judged against the split's own centralized reference: the same model trained on the
pooled shards and evaluated on the same test split, computed in the same run. Splits differ
(seed 0's reference is 0.967, seed 2's 0.953) and the federated runs follow their split, so an
absolute goal would be tuned to one seed. The quality gates hold over three seeds; the attack
comparisons are against the clean run of seed 0.

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

import pytest

from simulator.runner import SimConfig, run_simulation

SEEDS = (0, 1, 2)
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
    # agent saw acknowledged by the broker reached the aggregator (compared by update id).
    assert s["updates_rejected"] == {}
    assert s["updates_accepted"] == s["updates_received"] >= versions * 10
    assert s["updates_observed"] == s["updates_received"]
    assert s["updates_lost"] == [] and s["updates_accepted_twice"] == []


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("partition", ["iid", "dirichlet:0.5"])
def test_digits_comes_within_two_points_of_centralized(partition: str, seed: int) -> None:
    check_quality(simulate(partition=partition, seed=seed), VERSIONS)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_skewed_digits_comes_within_two_points_of_centralized(seed: int) -> None:
    s = simulate(partition="dirichlet:0.1", seed=seed, versions=SKEWED_VERSIONS)
    check_quality(s, SKEWED_VERSIONS)


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
