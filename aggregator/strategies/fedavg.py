"""Synchronous FedAvg (McMahan et al. 2017), the baseline: wait for N updates on the current
version (``min_updates``), or for ``deadline_s`` after the version was made if at least one
arrived, then take the sample-weighted mean (:func:`fedmqtt.aggregation.weighted_mean`, or a
robust reducer) through the server optimizer (``server_lr`` 1 and no momentum by default, which
is plain FedAvg). Only updates trained from the current version are accepted: anything older
is refused as stale, which is what makes this synchronous.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Strategy, load_optimizer, optimizer_state
from fedmqtt.params import F32


class FedAvg(Strategy):
    name = "fedavg"

    def __init__(
        self, cfg: StrategyConfig, d: int, segments: Sequence[tuple[int, int]] | None = None
    ) -> None:
        super().__init__(cfg, d, cfg.min_updates, segments)
        self.optimizer = load_optimizer(cfg, None)

    @property
    def max_staleness(self) -> int:
        return 0

    def aggregate(self, params: F32, median_norm: float | None) -> F32:
        ones = np.ones(len(self.pending), dtype=np.float32)
        return self.optimizer.step(params, self.buffered_delta(median_norm, ones))

    def extra_state(self) -> dict[str, Any]:
        return {"optimizer": optimizer_state(self.optimizer)}

    def load_extra(self, state: Mapping[str, Any]) -> None:
        self.optimizer = load_optimizer(self.cfg, state.get("optimizer"), self.d)
