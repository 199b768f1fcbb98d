"""Who is slow, who drops out, who attacks: a seeded schedule for every simulated device.

Same seed -> same device speeds, same dropout windows, same attackers; the schedule is drawn
from its own generator so that changing, say, the attack does not reshuffle the speeds.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import ConfigError
from fedmqtt.params import Params

ATTACKS = ("signflip", "scale", "noise", "labelflip")
T = TypeVar("T")


@dataclass(frozen=True)
class DeviceBehaviour:
    index: int
    compute_s: float  # emulated seconds of local training per round
    straggler: bool
    attacker: bool
    # Windows (start_s, end_s) after the simulation start during which the device is offline.
    offline: tuple[tuple[float, float], ...] = ()
    # Updates per honest update: above 1, the device sends every compute_s (already divided
    # by the rate) without waiting for a new global version.
    rate: float = 1.0


def schedule(
    n: int,
    *,
    seed: int,
    stragglers: float = 0.0,
    dropout: float = 0.0,
    attackers: float = 0.0,
    attacker_rate: float = 1.0,
    duration_s: float = 60.0,
    median_compute_s: float = 0.3,
) -> list[DeviceBehaviour]:
    for name, v in (("stragglers", stragglers), ("dropout", dropout), ("attackers", attackers)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"--{name} must be a fraction between 0 and 1")
    rng = np.random.default_rng([seed, 0xBEEF])
    speeds = rng.lognormal(math.log(median_compute_s), 0.3, n)
    order = rng.permutation(n)
    slow = set(order[: round(stragglers * n)].tolist())
    # Attackers are drawn from the other end so that they are not all stragglers.
    bad = set(order[::-1][: round(attackers * n)].tolist())
    gone = set(rng.permutation(n)[: round(dropout * n)].tolist())
    out = []
    for i in range(n):
        windows: tuple[tuple[float, float], ...] = ()
        if i in gone:  # one outage of 10-30 % of the run, starting in its first 60 %
            start = float(rng.uniform(0.1, 0.6) * duration_s)
            windows = ((start, start + float(rng.uniform(0.1, 0.3)) * duration_s),)
        rate = attacker_rate if i in bad else 1.0
        out.append(
            DeviceBehaviour(
                i,
                float(speeds[i]) * (10.0 if i in slow else 1.0) / rate,
                i in slow,
                i in bad,
                windows,
                rate,
            )
        )
    return out


def delta_attack(
    attack: str, *, seed: int, scale: float = 10.0, noise_std: float = 1.0
) -> Callable[[Params], Params]:
    """A model-poisoning transform of a device's delta (signflip, scale, noise)."""
    rng = np.random.default_rng(seed)
    if attack == "signflip":  # ascend instead of descend, amplified (Fang et al. 2020)
        return lambda d: {k: (-scale * v).astype(np.float32) for k, v in d.items()}
    if attack == "scale":  # boost one's own update (Bhagoji et al. 2019)
        return lambda d: {k: (scale * v).astype(np.float32) for k, v in d.items()}
    if attack == "noise":
        return lambda d: {
            k: rng.normal(0, noise_std, v.shape).astype(np.float32) for k, v in d.items()
        }
    raise ConfigError(f"{attack!r} is not a delta attack; use one of {ATTACKS}")


def label_flip(
    n_classes: int,
) -> Callable[
    [npt.NDArray[np.float32], npt.NDArray[np.generic]],
    tuple[npt.NDArray[np.float32], npt.NDArray[np.generic]],
]:
    """Data poisoning: train on y -> n_classes - 1 - y."""
    return lambda X, y: (X, (n_classes - 1 - y.astype(np.int64)).astype(np.int64))


def from_time(transform: Callable[..., T], start: float) -> Callable[..., T]:
    """``transform`` from wall-clock time ``start`` (``time.time()``) on; the identity on its
    arguments before (an attacker that behaves until it switches on, ``--attack-start``)."""

    def switched(*args: Any) -> Any:
        if time.time() >= start:
            return transform(*args)
        return args[0] if len(args) == 1 else args

    return switched
