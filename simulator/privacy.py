"""``fedmqtt simulate --dp central|local``: the simulator's differential-privacy options turned
into the aggregator's or the agents' ``[privacy]`` table, and the ε shown while it runs.

``--dp-clip C --dp-noise σ`` fixes the noise; ``--dp-epsilon E --dp-delta D`` derives σ so that
a device contributing to ``--dp-releases`` releases (default ``--versions``: a device is in at
most one release per version) stays within (E, D), and makes E the enforced budget.
"""

from __future__ import annotations

import argparse
from typing import Any

from fedmqtt.errors import ConfigError
from fedmqtt.privacy.accountant import gaussian_epsilon
from fedmqtt.privacy.config import DEFAULT_DELTA, PrivacyConfig, make_privacy

DP_MODES = ("off", "central", "local")


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--dp",
        default="off",
        choices=DP_MODES,
        help="differential privacy: central (trusted aggregator noises each release) or local "
        "(every device noises its own update); docs/privacy.md",
    )
    p.add_argument("--dp-clip", type=float, default=1.0, metavar="C", help="L2 clip bound")
    p.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA", help="noise multiplier")
    p.add_argument(
        "--dp-epsilon",
        type=float,
        default=None,
        metavar="E",
        help="target epsilon instead of --dp-noise (also the enforced budget)",
    )
    p.add_argument("--dp-delta", type=float, default=DEFAULT_DELTA, metavar="D")
    p.add_argument(
        "--dp-releases",
        type=int,
        default=None,
        metavar="N",
        help="releases per device the target epsilon is planned for (default: --versions)",
    )


def resolve(
    mode: str,
    *,
    clip: float,
    noise: float | None,
    epsilon: float | None,
    delta: float,
    releases: int | None,
    versions: int | None,
) -> PrivacyConfig:
    """The :class:`PrivacyConfig` the options describe (``mode`` off, central or local)."""
    if mode == "off":
        return make_privacy("off")
    if noise is None and epsilon is None:
        raise ConfigError(f"--dp {mode} needs --dp-noise SIGMA or --dp-epsilon E")
    planned = None
    if epsilon is not None:
        planned = releases if releases is not None else versions
        if planned is None:
            raise ConfigError("--dp-epsilon needs --dp-releases N or --versions N")
    return make_privacy(
        mode,
        clip=clip,
        noise_multiplier=noise,
        target_epsilon=epsilon,
        planned_releases=planned,
        delta=delta,
        where="--dp",
    )


def table(p: PrivacyConfig) -> dict[str, Any]:
    """``[privacy]`` for the aggregator (central) or an agent (local), σ already derived."""
    return {
        "mode": p.mode,
        "clip": p.clip,
        "noise_multiplier": p.noise_multiplier,
        "delta": p.delta,
        "max_epsilon": p.max_epsilon,
        "on_budget": "refuse",
    }


def local_epsilon(p: PrivacyConfig, worst_rounds: int) -> float:
    """ε of the local-DP device with most noised updates."""
    return gaussian_epsilon(p.noise_multiplier, worst_rounds, p.delta)
