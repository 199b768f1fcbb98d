"""Simulator building blocks: partitions, schedules and attacks are seeded and correct."""

from __future__ import annotations

import numpy as np
import pytest

from fedmqtt.errors import ConfigError
from simulator import behaviour, datasets
from simulator.partition import partition


@pytest.fixture(scope="module")
def digits() -> datasets.Dataset:
    return datasets.load("digits", seed=0)


def test_digits_split_is_seeded(digits: datasets.Dataset) -> None:
    again = datasets.load("digits", seed=0)
    np.testing.assert_array_equal(digits.y_test, again.y_test)
    assert len(digits.y_test) == 359 and digits.X_train.shape == (1438, 64)
    assert digits.feature_scale[0] == 1 / 16


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.5", "dirichlet:0.1", "shards:2"])
def test_partition_covers_each_sample_once(digits: datasets.Dataset, scheme: str) -> None:
    parts = partition(digits.y_train, 20, scheme, seed=3)
    allidx = np.concatenate(parts)
    assert len(parts) == 20
    assert sorted(allidx.tolist()) == list(range(len(digits.y_train)))
    assert min(len(p) for p in parts) >= 10
    again = partition(digits.y_train, 20, scheme, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_small_beta_is_skewed(digits: datasets.Dataset) -> None:
    def classes_per_device(scheme: str) -> float:
        parts = partition(digits.y_train, 20, scheme, seed=1)
        return float(
            np.mean(
                [
                    (np.bincount(digits.y_train[p], minlength=10) >= 0.05 * len(p)).sum()
                    for p in parts
                ]
            )
        )

    assert classes_per_device("dirichlet:0.1") < classes_per_device("iid") - 3


def test_shards_give_few_labels(digits: datasets.Dataset) -> None:
    parts = partition(digits.y_train, 20, "shards:2", seed=0)
    assert max(len(np.unique(digits.y_train[p])) for p in parts) <= 4


@pytest.mark.parametrize("bad", ["foo", "dirichlet", "dirichlet:-1", "shards:x", "iid:2"])
def test_bad_partition_names(digits: datasets.Dataset, bad: str) -> None:
    with pytest.raises(ConfigError):
        partition(digits.y_train, 5, bad, seed=0)


def test_schedule_is_seeded_and_counts() -> None:
    a = behaviour.schedule(50, seed=7, stragglers=0.2, dropout=0.1, attackers=0.2)
    b = behaviour.schedule(50, seed=7, stragglers=0.2, dropout=0.1, attackers=0.2)
    assert a == b
    assert sum(d.straggler for d in a) == 10
    assert sum(d.attacker for d in a) == 10
    assert sum(bool(d.offline) for d in a) == 5
    slow = np.median([d.compute_s for d in a if d.straggler])
    fast = np.median([d.compute_s for d in a if not d.straggler])
    assert slow > 5 * fast
    c = behaviour.schedule(50, seed=8, stragglers=0.2)
    assert [d.compute_s for d in c] != [d.compute_s for d in a]


def test_attacks_transform_deltas() -> None:
    d = {"W0": np.ones((2, 2), np.float32)}
    assert behaviour.delta_attack("signflip", seed=0)(d)["W0"][0, 0] == -10
    assert behaviour.delta_attack("scale", seed=0)(d)["W0"][0, 0] == 10
    noisy = behaviour.delta_attack("noise", seed=0)(d)["W0"]
    assert noisy.dtype == np.float32 and not np.array_equal(noisy, d["W0"])
    _, y = behaviour.label_flip(10)(np.zeros((3, 1), np.float32), np.array([0, 1, 9]))
    assert y.tolist() == [9, 8, 0]
    with pytest.raises(ConfigError):
        behaviour.delta_attack("labelflip", seed=0)


def test_synthetic_is_heterogeneous() -> None:
    ds = datasets.load("synthetic", seed=0, n_devices=10)
    assert len(ds.device_shards) == 10
    assert ds.X_train.shape[1] == 60
    sizes = [len(s[1]) for s in ds.device_shards]
    assert max(sizes) > 2 * min(sizes)


def test_failed_rounds_are_counted_over_restarts_and_summed() -> None:
    from types import SimpleNamespace

    from simulator import fleet
    from simulator.runner import _traffic

    def agent(failed: int) -> SimpleNamespace:
        return SimpleNamespace(
            updates_sent=1,
            downloaded={"plan": 10},
            bytes_written=5,
            rounds_completed=2,
            fetches=1,
            rejected={},
            rounds_failed=failed,
        )

    one = fleet._counts_of(agent(1)).plus(fleet._counts_of(agent(2)))  # restarted once
    assert one.failed == 3 and one.rounds == 4
    s = _traffic({"a": one, "b": fleet._counts_of(agent(0))}, 10.0)
    assert s["rounds_failed_by_agents"] == 3 and s["rounds_by_agents"] == 6
