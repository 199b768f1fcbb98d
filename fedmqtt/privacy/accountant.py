"""(ε, δ) accounting of repeated Gaussian releases, by Google's ``dp-accounting`` library.

Every release this project makes under differential privacy is one Gaussian mechanism with the
same noise multiplier σ (noise standard deviation σ·S for an L2 sensitivity S): an aggregated
buffer (central DP) or one noised update (local DP). A device's privacy loss therefore depends
only on σ and on how many releases it contributed to, ``k``, and is the adaptive composition of
``k`` Gaussian mechanisms. This module asks the library's Rényi-DP accountant
(:class:`dp_accounting.rdp.RdpAccountant`, add-or-remove-one neighbouring relation) for ε at δ;
it never uses a hand-written formula.

No amplification by sampling is claimed: devices choose when they train and send, the server
does not sample them at random, so every release is accounted at full strength for every device
that contributed to it. ε of the worst-case device (the one with most releases) bounds every
device's ε, because ε is non-decreasing in ``k``.

The two ways to configure it: fix σ and read ε as it grows (:meth:`GaussianAccountant.epsilon`),
or give a target (ε, δ) and a planned number of releases per device and derive σ
(:func:`noise_for_target`).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

from fedmqtt.errors import ConfigError

ACCOUNTANT = "rdp"  # the accountant every ε of this project comes from (documented)


def _check_delta(delta: float) -> float:
    d = float(delta)
    if not 0.0 < d < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")
    return d


def _check_sigma(sigma: float) -> float:
    s = float(sigma)
    if not (math.isfinite(s) and s > 0):
        raise ValueError(f"noise multiplier must be finite and > 0, got {sigma!r}")
    return s


def _library() -> Any:  # the module (untyped)
    """The ``dp_accounting`` package; ConfigError naming the extra to install without it."""
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError(
            "differential privacy needs Google's dp-accounting package: "
            "pip install 'fedmqtt[privacy]'"
        ) from None
    return dp_accounting


@lru_cache(maxsize=4096)
def gaussian_epsilon(sigma: float, releases: int, delta: float) -> float:
    """ε at ``delta`` after ``releases`` Gaussian releases with noise multiplier ``sigma``
    (RDP accountant of ``dp-accounting``; 0 for no release)."""
    s, d = _check_sigma(sigma), _check_delta(delta)
    k = int(releases)
    if k < 0:
        raise ValueError(f"releases must be >= 0, got {releases!r}")
    if k == 0:
        return 0.0
    dp_accounting = _library()
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(s), k)
    return float(acc.get_epsilon(d))


def noise_for_target(epsilon: float, delta: float, releases: int) -> float:
    """The smallest noise multiplier σ (to 0.1 %) whose ``releases`` Gaussian releases stay
    within (``epsilon``, ``delta``), by ``dp_accounting.calibrate_dp_mechanism``."""
    e, d = float(epsilon), _check_delta(delta)
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"target epsilon must be finite and > 0, got {epsilon!r}")
    k = int(releases)
    if k < 1:
        raise ValueError(f"planned releases must be >= 1, got {releases!r}")
    dp_accounting = _library()
    from dp_accounting.rdp import RdpAccountant

    def event(sigma: float) -> Any:  # a dp_accounting.DpEvent
        return dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(sigma), k)

    sigma = dp_accounting.calibrate_dp_mechanism(
        RdpAccountant,
        event,
        e,
        d,
        bracket_interval=dp_accounting.LowerEndpointAndGuess(1e-3, 1.0),
        tol=1e-3,
    )
    sigma = float(sigma)
    # calibrate_dp_mechanism returns a value within tol of the boundary on the safe side; check.
    if gaussian_epsilon(sigma, k, d) > e * (1 + 1e-9):
        raise ValueError("noise calibration did not reach the target epsilon")
    return sigma


def releases_within(sigma: float, delta: float, max_epsilon: float) -> int:
    """The most releases one device may contribute to with ε <= ``max_epsilon`` (can be 0)."""
    e = float(max_epsilon)
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"max_epsilon must be finite and > 0, got {max_epsilon!r}")
    if gaussian_epsilon(sigma, 1, delta) > e:
        return 0
    lo, hi = 1, 2
    while gaussian_epsilon(sigma, hi, delta) <= e:
        lo, hi = hi, hi * 2
        if hi > 1 << 40:
            return hi
    while hi - lo > 1:  # ε(lo) <= e < ε(hi); ε is non-decreasing in the count
        mid = (lo + hi) // 2
        if gaussian_epsilon(sigma, mid, delta) <= e:
            lo = mid
        else:
            hi = mid
    return lo
