"""FedBuff (Nguyen et al., AISTATS 2022): aggregate every K accepted updates.

Each delta is weighted by its sample count and discounted by ``s(tau)`` (default
``1/sqrt(1+tau)``, see ``[strategy] staleness``); the aggregate goes through a server optimizer
(``server_lr``, optional heavy-ball ``momentum``, or FedAdagrad/FedAdam/FedYogi with
``server_optimizer``, :mod:`fedmqtt.aggregation.serveropt`). ``robust`` swaps the weighted
mean for a coordinate-wise trimmed mean or median and/or clips every row to ``clip_factor``
times the median norm of recently accepted updates. The math is
:func:`fedmqtt.aggregation.fedbuff_aggregate` and :class:`fedmqtt.aggregation.ServerOptimizer`
(or :mod:`fedmqtt.aggregation.serveropt`); this class decides *when* and keeps state.

*When*: once the buffer holds ``buffer_size`` updates or, with ``deadline_s > 0``, once
``deadline_s`` seconds have passed since the current version was made and the buffer holds at
least one update. The deadline bounds how long one missing device can hold a version back, which
makes a buffer as large as the fleet (every device in every version, the fewest updates to a
target) usable when devices go offline or slow down.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Strategy, load_optimizer, optimizer_state
from fedmqtt.params import F32


class FedBuff(Strategy):
    name = "fedbuff"

    def __init__(
        self, cfg: StrategyConfig, d: int, segments: Sequence[tuple[int, int]] | None = None
    ) -> None:
        super().__init__(cfg, d, cfg.buffer_size, segments)
        self.optimizer = load_optimizer(cfg, None)

    def aggregate(self, params: F32, median_norm: float | None) -> F32:
        s = np.array([p.weight for p in self.pending], dtype=np.float32)
        return self.optimizer.step(params, self.buffered_delta(median_norm, s))

    def extra_state(self) -> dict[str, Any]:
        return {"optimizer": optimizer_state(self.optimizer)}

    def load_extra(self, state: Mapping[str, Any]) -> None:
        self.optimizer = load_optimizer(self.cfg, state.get("optimizer"), self.d)
