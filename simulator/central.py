"""The centralized reference: the same model trained on the union of all shards.

A federated result means little without it: it is the accuracy the fleet would reach if the
data could be pooled, computed in the same run on the same test split.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from fedmqtt.models import TrainConfig, build_model, init_params, train_local
from fedmqtt.models.spec import ModelSpec


def centralized_accuracy(
    spec: ModelSpec,
    X: npt.NDArray[np.float32],
    y: npt.NDArray[Any],
    X_test: npt.NDArray[np.float32],
    y_test: npt.NDArray[Any],
    *,
    epochs: int,
    lr: float,
    batch_size: int = 32,
    momentum: float = 0.9,
    seed: int = 0,
) -> float:
    rng = np.random.default_rng(seed)
    params = init_params(spec, rng)
    cfg = TrainConfig(epochs=epochs, lr=lr, batch_size=batch_size, momentum=momentum)
    params, _ = train_local(spec, params, X, y, cfg, rng)
    return float(build_model(spec, params).score(X_test, y_test))
