"""Aggregation math: pure numpy functions on flat float32 parameter vectors.

One algorithm per module, each citing its paper: :mod:`.staleness` (discounts s(tau)),
:mod:`.fedasync` (mix each update in on arrival), :mod:`.fedbuff` (buffered, staleness-weighted
steps with a server optimizer), :mod:`.fedavg` (the synchronous sample-weighted mean) and
:mod:`.robust` (norm clipping, trimmed mean, median). No I/O and no MQTT here: the aggregator
decides *when* to aggregate, these functions only compute *what*. A model's tensors are one
vector via :meth:`fedmqtt.params.Layout.flatten`; a batch of K deltas is a (K, d) array.
Invalid input raises ValueError (ConfigError for configuration text); inputs are never
modified.
"""

from fedmqtt.aggregation.fedasync import fedasync_alpha, fedasync_mix
from fedmqtt.aggregation.fedavg import fedavg_step, mean_of_rows, weighted_mean
from fedmqtt.aggregation.fedbuff import REDUCERS, Reducer, ServerOptimizer, fedbuff_aggregate
from fedmqtt.aggregation.robust import NormBound, clip_by_norm, coordinate_median, trimmed_mean
from fedmqtt.aggregation.staleness import (
    ConstantStaleness,
    HingeStaleness,
    PolynomialStaleness,
    Staleness,
    constant,
    hinge,
    parse_staleness,
    polynomial,
)

__all__ = [
    "REDUCERS",
    "ConstantStaleness",
    "HingeStaleness",
    "NormBound",
    "PolynomialStaleness",
    "Reducer",
    "ServerOptimizer",
    "Staleness",
    "clip_by_norm",
    "constant",
    "coordinate_median",
    "fedasync_alpha",
    "fedasync_mix",
    "fedavg_step",
    "fedbuff_aggregate",
    "hinge",
    "mean_of_rows",
    "parse_staleness",
    "polynomial",
    "trimmed_mean",
    "weighted_mean",
]
