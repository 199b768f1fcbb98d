"""The ``[privacy]`` table, shared by the aggregator (central DP) and the agent (local DP).

Options (docs/privacy.md):

* ``mode``: ``off`` (default), ``central`` (aggregator only: the trusted aggregator clips and
  noises each release) or ``local`` (agent only: the device clips and noises its own update).
* ``clip``: the L2 bound C of one device's delta per release (required when DP is on).
* Either ``noise_multiplier`` σ (noise standard deviation σ·C; ε is reported as it grows), or
  ``target_epsilon`` with ``planned_releases`` (σ is derived so that a device contributing to
  that many releases stays within (target_epsilon, delta)).
* ``delta`` (default 1e-5).
* ``max_epsilon``: the budget of one device (0: none; defaults to ``target_epsilon`` when a
  target is given). ``on_budget``: ``refuse`` (default: that device's further updates are
  refused) or ``stop`` (the aggregator stops applying updates altogether).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from fedmqtt.errors import ConfigError
from fedmqtt.privacy.accountant import noise_for_target, releases_within
from fedmqtt.tomltable import Table

MODES: Final = ("off", "central", "local")
BUDGET_POLICIES: Final = ("refuse", "stop")
DEFAULT_DELTA: Final = 1e-5
# The plan's ``extra`` key carrying the central-DP clip bound C to the devices.
PLAN_CLIP_KEY: Final = "dp_clip"


@dataclass(frozen=True)
class PrivacyConfig:
    mode: str = "off"
    clip: float = 0.0
    noise_multiplier: float = 0.0  # σ: given, or derived from the target
    delta: float = DEFAULT_DELTA
    max_epsilon: float = 0.0  # 0: no budget
    on_budget: str = "refuse"
    target_epsilon: float | None = None
    planned_releases: int | None = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    @property
    def max_releases(self) -> int | None:
        """Releases one device may contribute to within ``max_epsilon`` (None: no budget)."""
        if not self.enabled or self.max_epsilon <= 0:
            return None
        return releases_within(self.noise_multiplier, self.delta, self.max_epsilon)


def make_privacy(
    mode: str = "off",
    *,
    clip: float = 0.0,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    planned_releases: int | None = None,
    delta: float = DEFAULT_DELTA,
    max_epsilon: float | None = None,
    on_budget: str = "refuse",
    where: str = "[privacy]",
) -> PrivacyConfig:
    """A validated :class:`PrivacyConfig` (σ derived from a target); ConfigError if unusable."""

    def err(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where} {key}: {msg}")

    if mode not in MODES:
        raise err("mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    if on_budget not in BUDGET_POLICIES:
        raise err("on_budget", f"must be one of {', '.join(BUDGET_POLICIES)}")
    if not 0.0 < delta < 1.0:
        raise err("delta", f"must be in (0, 1), got {delta!r}")
    if mode == "off":
        return PrivacyConfig(delta=delta)
    if not clip > 0:
        raise err("clip", "is required (> 0) when differential privacy is on")
    if (noise_multiplier is None) == (target_epsilon is None):
        raise err(
            "noise_multiplier",
            "give either noise_multiplier, or target_epsilon with planned_releases",
        )
    if target_epsilon is not None:
        if not target_epsilon > 0:
            raise err("target_epsilon", "must be > 0")
        if planned_releases is None or planned_releases < 1:
            raise err("planned_releases", "is required (>= 1) with target_epsilon")
        try:
            sigma = noise_for_target(target_epsilon, delta, planned_releases)
        except ValueError as e:
            raise err("target_epsilon", str(e)) from None
        budget = target_epsilon if max_epsilon is None else max_epsilon
    else:
        assert noise_multiplier is not None
        if planned_releases is not None:
            raise err("planned_releases", "only applies with target_epsilon")
        if not noise_multiplier > 0:
            raise err("noise_multiplier", "must be > 0")
        sigma = float(noise_multiplier)
        budget = 0.0 if max_epsilon is None else max_epsilon
    if budget < 0:
        raise err("max_epsilon", "must be >= 0 (0: no budget)")
    return PrivacyConfig(
        mode=mode,
        clip=float(clip),
        noise_multiplier=sigma,
        delta=float(delta),
        max_epsilon=float(budget),
        on_budget=on_budget,
        target_epsilon=None if target_epsilon is None else float(target_epsilon),
        planned_releases=planned_releases,
    )


def read_privacy(t: Table, modes: tuple[str, ...]) -> PrivacyConfig:
    """``[privacy]`` read from a TOML table; ``modes``: the modes this service accepts."""
    mode = t.text("mode", "off")
    if mode not in modes:
        raise t.error("mode", f"must be one of {', '.join(modes)} here, not {mode!r}")
    target = t.opt_number("target_epsilon", lo=0.0)
    releases = t.opt_integer("planned_releases", lo=1)
    sigma = t.opt_number("noise_multiplier", lo=0.0)
    budget = t.opt_number("max_epsilon", lo=0.0)
    on_budget = t.text("on_budget", "refuse")
    if on_budget == "stop" and "central" not in modes:
        raise t.error("on_budget", "a device can only refuse to send (stop is the aggregator's)")
    return make_privacy(
        mode,
        clip=t.number("clip", 0.0, lo=0.0),
        noise_multiplier=sigma,
        target_epsilon=target,
        planned_releases=releases,
        delta=t.number("delta", DEFAULT_DELTA, lo=0.0, hi=1.0),
        max_epsilon=budget,
        on_budget=on_budget,
    )


def check_central(
    p: PrivacyConfig,
    *,
    strategy: str,
    reducer: str,
    adaptive_clip: bool,
    max_per_device: int,
    norm_reject_factor: float,
) -> None:
    """Refuse settings under which the central-DP sensitivity argument does not hold
    (docs/privacy.md, "Compatible settings"); nothing to check unless ``p.mode`` is central."""
    if p.mode != "central":
        return
    if reducer != "mean":
        raise ConfigError(
            f"[strategy] robust: {reducer} cannot be combined with [privacy] mode = central: "
            "the noise is calibrated to the sensitivity of the clipped sum (one device moves "
            f"it by at most max_per_device x clip); a coordinate-wise {reducer} has no such "
            "bound (one row can move every coordinate by the gap between order statistics). "
            "Use robust = none (the DP clip already bounds every update)"
        )
    if adaptive_clip:
        raise ConfigError(
            "[strategy] robust: clip (a bound relative to the median norm of other devices' "
            "updates) cannot be combined with [privacy] mode = central: adding or removing "
            "one device would change how every other row is clipped. [privacy] clip is the "
            "fixed bound that replaces it"
        )
    if strategy != "fedasync" and max_per_device < 1:
        raise ConfigError(
            "[strategy] max_per_device: must be >= 1 with [privacy] mode = central: the "
            "noise is scaled to the rows one device may hold in a buffer"
        )
    if norm_reject_factor > 0:
        raise ConfigError(
            "[limits] norm_reject_factor: must be 0 with [privacy] mode = central: that gate "
            "refuses an update relative to the median norm of other devices' updates, so one "
            "device would decide whether others are used. Every update is clipped to "
            "[privacy] clip anyway; [limits] max_norm (a fixed bound) may stay"
        )
