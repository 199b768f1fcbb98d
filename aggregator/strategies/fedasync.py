"""FedAsync (Xie et al. 2019): mix every accepted update into the model as it arrives.

``w <- (1 - alpha_t) w + alpha_t x`` with ``alpha_t = alpha * s(tau)``
(:func:`fedmqtt.aggregation.fedasync_alpha` / :func:`~fedmqtt.aggregation.fedasync_mix`). The
device sends its delta against the version it trained from, not its whole model; the client
model is taken as ``x = w + delta`` (the current model plus the delta), which makes the step
``w + alpha_t * delta`` and avoids keeping every past version to rebuild ``w_base + delta``.
The staleness discount is what accounts for the base being older. Every accepted update makes a
new version.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Strategy
from fedmqtt.aggregation import fedasync_alpha, fedasync_mix
from fedmqtt.params import F32


class FedAsync(Strategy):
    name = "fedasync"

    def __init__(
        self, cfg: StrategyConfig, d: int, segments: Sequence[tuple[int, int]] | None = None
    ) -> None:
        super().__init__(cfg, d, 1, segments)

    def ready(self, now: float) -> bool:
        return len(self.pending) >= 1

    def aggregate(self, params: F32, median_norm: float | None) -> F32:
        p = self.pending[0]
        row = self.clipped(median_norm)[0]
        alpha_t = fedasync_alpha(self.cfg.alpha, self.staleness, p.tau)
        with np.errstate(over="ignore"):
            client = params + row
        return fedasync_mix(params, client, alpha_t)
