"""Aggregation strategies selected by ``[strategy] name``: stateful wrappers around the pure
functions of :mod:`fedmqtt.aggregation` that decide when to aggregate and keep the buffer."""

from __future__ import annotations

from collections.abc import Sequence

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Pending, Strategy
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff

__all__ = ["FedAsync", "FedAvg", "FedBuff", "Pending", "Strategy", "build_strategy"]


def build_strategy(
    cfg: StrategyConfig, d: int, segments: Sequence[tuple[int, int]] | None = None
) -> Strategy:
    """The configured strategy for a model of ``d`` values whose tensors take ``segments``
    (start, stop) of each row (one tensor of ``d`` if None)."""
    if cfg.name == "fedbuff":
        return FedBuff(cfg, d, segments)
    if cfg.name == "fedasync":
        return FedAsync(cfg, d, segments)
    if cfg.name == "fedavg":
        return FedAvg(cfg, d, segments)
    raise ValueError(f"unknown strategy {cfg.name!r}")
