"""Participation over the real broker: the simulator's fleet with the plan's selection, a real
aggregator that enforces it and real agents that obey it."""

from __future__ import annotations

import io
from typing import Any

import pytest

from fedmqtt.cohort import Selection
from simulator.runner import SimConfig, run_simulation

FED = "sim"  # simulator.runner's federation id


def run(**changes: Any) -> dict[str, Any]:
    base = SimConfig(clients=20, duration=120.0, compute_time=0.05, quiet=True, seed=0)
    return run_simulation(SimConfig(**{**base.__dict__, **changes}), out=io.StringIO())


def selected(part: float, window: int, w: int, n: int = 20) -> set[str]:
    sel = Selection(participation=part, window=window)
    return {f"dev{i:04d}" for i in range(n) if sel.trains(FED, f"dev{i:04d}", {}, w * window)}


def test_participation_fraction_trains_about_that_share_per_window() -> None:
    s = run(participation=0.3, participation_window=2, buffer_size=3, versions=24)
    assert s["error"] is None, s["error"]
    assert s["versions"] >= 24
    # The agents obey the plan: the aggregator refused nothing as not selected.
    assert "not_selected" not in s["updates_rejected"], s["updates_rejected"]
    trained = {int(w): k for w, k in s["trained_per_window"].items()}
    assert len(trained) >= 10, trained
    for w, k in trained.items():
        assert 1 <= k <= len(selected(0.3, 2, w)), (w, k)
    share = sum(trained.values()) / (20 * len(trained))
    assert 0.15 <= share <= 0.4, (share, trained)
    # About a third of the fleet's uploads: 12 windows of 2 versions from ~6 devices.
    assert s["updates_received"] <= 0.45 * 20 * s["versions"], s["updates_received"]
    # And of its downloads: a device fetches the versions it trains on (plus its first model
    # and a few fetches that time out), not every version it is ready for.
    assert s["model_fetches_by_agents"] <= s["rounds_by_agents"] + 2 * 20, s


@pytest.mark.slow
def test_participation_reaches_the_target_with_fewer_uploads() -> None:
    """20 agents on digits IID, FedBuff K = 5, devices training 0.5 s a round: participation
    0.3 against everyone training. Both reach 95 % test accuracy; with 0.3 about 30 % of the
    devices train in each window, so the fleet uploads at about a third of the rate."""
    common: dict[str, Any] = {
        "partition": "iid",
        "buffer_size": 5,
        "compute_time": 0.5,
        "target_accuracy": 0.95,
        "stop_at_target": True,
        "duration": 300.0,
    }
    full = run(**common)
    part = run(participation=0.3, participation_window=1, **common)
    for s in (full, part):
        assert s["error"] is None and s["time_to_target_s"] is not None, s
    assert "not_selected" not in part["updates_rejected"]
    trained = list(part["trained_per_window"].values())
    share = sum(trained) / (20 * len(trained))
    assert 0.2 <= share <= 0.4, share
    rate = {
        k: s["uploads_to_target"] / s["time_to_target_s"]
        for k, s in (("full", full), ("part", part))
    }
    assert rate["part"] <= 0.6 * rate["full"], rate
    print(
        {
            k: {
                "uploads_to_target": s["uploads_to_target"],
                "time_to_target_s": s["time_to_target_s"],
                "versions": s["versions"],
                "uploads_per_s": round(rate[k], 2),
            }
            for k, s in (("full", full), ("part", part))
        },
        "share",
        round(share, 3),
    )
