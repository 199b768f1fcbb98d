"""Local differential privacy on the device (``[privacy] mode = "local"``, docs/privacy.md).

The device does not trust the aggregator: before its delta is encoded, it clips the delta to L2
norm ``clip`` (all tensors together) and adds Gaussian noise of standard deviation
``noise_multiplier * 2 * clip`` to every coordinate. ``2 * clip`` is the sensitivity here: the
neighbouring input is *any* other data on this device, and two clipped deltas differ by at most
the diameter of the clip ball. Each update is one Gaussian release; the device counts them in
``privacy.json`` in its state directory (written atomically, and *before* the update is queued,
so a crash can only over-count) and, with ``max_epsilon``, refuses to train and send once one
more update would exceed it. Encoding comes after the noise: int8 rounding and top-k selection
(with its error-feedback residual, itself made of noised values) are post-processing and keep
the guarantee.

The noise is drawn from ``os.urandom`` (the kernel's CSPRNG), not from the seeded training
randomness, so a known ``[training] seed`` does not reveal it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from fedmqtt.errors import ConfigError
from fedmqtt.fsutil import atomic_write_bytes
from fedmqtt.params import Params
from fedmqtt.privacy.clip import clip_params, gaussian_params
from fedmqtt.privacy.config import PrivacyConfig

log = logging.getLogger(__name__)

STATE_FILE = "privacy.json"
_UNIT = 2.0**-32


class SystemUniform:
    """Uniform floats in [0, 1) from ``os.urandom`` (for :func:`gaussian_params`)."""

    def random(self, size: int, dtype: Any = np.float64) -> npt.NDArray[np.float64]:
        raw = np.frombuffer(os.urandom(4 * int(size)), dtype="<u4")
        return raw.astype(np.float64) * _UNIT


class LocalPrivacy:
    def __init__(self, cfg: PrivacyConfig, state_dir: Path) -> None:
        if cfg.mode != "local":
            raise ValueError("LocalPrivacy needs [privacy] mode = local")
        self.cfg = cfg
        self.path = state_dir / STATE_FILE
        self.max_releases = cfg.max_releases  # loads the accountant once, at start
        self.releases = 0
        self._warned = False
        self._load()

    def _load(self) -> None:
        try:
            saved = json.loads(self.path.read_text())
        except FileNotFoundError:
            return
        except (OSError, ValueError) as e:
            # Never start again from 0: an unreadable count could reset the budget.
            raise OSError(f"{self.path} is unreadable ({e}); the privacy count is unknown") from e
        releases = int(saved.get("releases", 0))
        same = (saved.get("noise_multiplier"), saved.get("clip")) == (
            self.cfg.noise_multiplier,
            self.cfg.clip,
        )
        if releases and not same:
            # ε of past updates depends on how they were noised: refuse to guess.
            raise ConfigError(
                f"[privacy]: {self.path} counts {releases} update(s) noised with "
                f"noise_multiplier {saved.get('noise_multiplier')}, clip {saved.get('clip')}; "
                f"the config says {self.cfg.noise_multiplier}, {self.cfg.clip}. Restore those "
                "settings (the accountant cannot continue across a change)"
            )
        self.releases = int(saved.get("releases", 0))

    def epsilon(self) -> float:
        from fedmqtt.privacy.accountant import gaussian_epsilon

        return gaussian_epsilon(self.cfg.noise_multiplier, self.releases, self.cfg.delta)

    def spent(self) -> bool:
        """True once one more update would exceed ``max_epsilon`` (logged once)."""
        if self.max_releases is None or self.releases < self.max_releases:
            return False
        if not self._warned:
            self._warned = True
            log.warning(
                "local privacy budget spent: %d updates sent (max_epsilon %s); this device "
                "sends no more updates",
                self.releases,
                self.cfg.max_epsilon,
            )
        return True

    def privatize(self, delta: Params) -> Params:
        """Clip and noise ``delta``, and count the release durably before it can be sent."""
        clipped, _ = clip_params(delta, self.cfg.clip)
        noisy = gaussian_params(
            clipped, self.cfg.noise_multiplier * 2.0 * self.cfg.clip, SystemUniform()
        )
        self.releases += 1
        body = {
            "releases": self.releases,
            "noise_multiplier": self.cfg.noise_multiplier,
            "clip": self.cfg.clip,
            "delta": self.cfg.delta,
        }
        atomic_write_bytes(self.path, json.dumps(body).encode())
        return noisy
