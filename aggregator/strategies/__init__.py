"""Aggregation strategies selected by ``[strategy] name``: stateful wrappers around the pure
functions of :mod:`fedmqtt.aggregation` that decide when to aggregate and keep the buffer."""

from __future__ import annotations

from aggregator.config import StrategyConfig
from aggregator.strategies.base import Pending, Strategy
from aggregator.strategies.fedasync import FedAsync
from aggregator.strategies.fedavg import FedAvg
from aggregator.strategies.fedbuff import FedBuff

__all__ = ["FedAsync", "FedAvg", "FedBuff", "Pending", "Strategy", "build_strategy"]


def build_strategy(cfg: StrategyConfig, d: int) -> Strategy:
    if cfg.name == "fedbuff":
        return FedBuff(cfg, d)
    if cfg.name == "fedasync":
        return FedAsync(cfg, d)
    if cfg.name == "fedavg":
        return FedAvg(cfg, d)
    raise ValueError(f"unknown strategy {cfg.name!r}")
