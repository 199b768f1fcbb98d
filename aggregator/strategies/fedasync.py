"""FedAsync (Xie et al. 2019): mix every accepted update into the model as it arrives.

``w <- (1 - alpha_t) w + alpha_t x`` with ``alpha_t = alpha * s(tau)``
(:func:`fedmqtt.aggregation.fedasync_alpha` / :func:`~fedmqtt.aggregation.fedasync_mix`). The
device sends its delta against the version it trained from, not its whole model; the client
model is taken as ``x = w + delta`` (the current model plus the delta), which makes the step
``w + alpha_t * delta`` and avoids keeping every past version to rebuild ``w_base + delta``.
The staleness discount is what accounts for the base being older. Every accepted update makes a
new version. With ``[strategy] server_optimizer`` adagrad, adam or yogi, the step
``alpha_t * delta`` is the pseudo-gradient of that optimizer instead
(:mod:`fedmqtt.aggregation.serveropt`).

One device's weight: a device makes at most ``[strategy] max_per_device`` of any
``device_window`` consecutive versions; an update that would exceed it is refused
(``device_quota``). The senders of the last ``device_window - 1`` versions are part of the
checkpoint, so a restart does not reset the window.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Strategy, load_optimizer, optimizer_state
from fedmqtt.aggregation import fedasync_alpha, fedasync_mix
from fedmqtt.aggregation.serveropt import ADAPTIVE
from fedmqtt.errors import DEVICE_QUOTA, RejectedError
from fedmqtt.params import F32


class FedAsync(Strategy):
    name = "fedasync"
    defers = False  # its quota spans a window of versions: the next buffer may refuse too

    def __init__(
        self, cfg: StrategyConfig, d: int, segments: Sequence[tuple[int, int]] | None = None
    ) -> None:
        super().__init__(cfg, d, 1, segments)
        # Senders of the newest versions, oldest first: the window but the version to come.
        self.recent: deque[str] = deque(maxlen=cfg.device_window - 1)
        # An adaptive server optimizer takes the mixing step alpha_t * delta as its
        # pseudo-gradient; without one the mix is the server step.
        self.optimizer = load_optimizer(cfg, None) if cfg.server_optimizer in ADAPTIVE else None

    def admit(self, sender: str) -> None:
        limit = self.cfg.max_per_device
        if self.privacy is not None:
            self.privacy.admit(sender)
        if limit and self.recent.count(sender) >= limit:
            raise RejectedError(
                DEVICE_QUOTA,
                f"device {sender!r} made {limit} of the last {self.cfg.device_window - 1} "
                f"version(s) ([strategy] max_per_device per device_window "
                f"{self.cfg.device_window})",
            )

    @property
    def timed(self) -> bool:
        return False  # a buffer of one is full with its first update: no deadline applies

    def aggregate(self, params: F32, median_norm: float | None) -> F32:
        p = self.pending[0]
        if self.privacy is not None:  # central DP: clip to C and noise this one release
            row = self.private_delta(np.ones(1, dtype=np.float32))
        else:
            row = self.clipped(median_norm)[0]
        alpha_t = fedasync_alpha(self.cfg.alpha, self.staleness, p.tau)
        if self.optimizer is not None:
            step = np.multiply(row, alpha_t, dtype=np.float32)
            new = self.optimizer.step(params, step)
        else:
            with np.errstate(over="ignore"):
                client = params + row
            new = fedasync_mix(params, client, alpha_t)
        self.recent.append(p.meta.sender)
        return new

    def extra_state(self) -> dict[str, Any]:
        out: dict[str, Any] = {"recent_senders": list(self.recent)}
        if self.optimizer is not None:
            out["optimizer"] = optimizer_state(self.optimizer)
        return out

    def load_extra(self, state: Mapping[str, Any]) -> None:
        senders = state.get("recent_senders", [])
        if not isinstance(senders, list) or not all(isinstance(s, str) for s in senders):
            raise ValueError("recent_senders must be a list of device ids")
        self.recent.clear()
        self.recent.extend(senders)
        if self.optimizer is not None:
            self.optimizer = load_optimizer(self.cfg, state.get("optimizer"), self.d)
