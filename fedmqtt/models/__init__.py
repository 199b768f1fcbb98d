"""The numpy model zoo: dense networks described by a :class:`ModelSpec`, trained locally.

Only numpy is imported here so that a device can use the zoo without scikit-learn; the
conversions to and from scikit-learn estimators live in
:mod:`fedmqtt.models.sklearn_adapters`, which the aggregator and simulator import explicitly.
"""

from fedmqtt.models.dense import forward, init_params, loss_and_grad
from fedmqtt.models.spec import KINDS, Kind, ModelSpec
from fedmqtt.models.train import TrainConfig, TrainStats, train_local
from fedmqtt.models.zoo import (
    LinearRegression,
    MLPClassifier,
    NotFittedError,
    SoftmaxRegression,
    build_model,
)

__all__ = [
    "KINDS",
    "Kind",
    "LinearRegression",
    "MLPClassifier",
    "ModelSpec",
    "NotFittedError",
    "SoftmaxRegression",
    "TrainConfig",
    "TrainStats",
    "build_model",
    "forward",
    "init_params",
    "loss_and_grad",
    "train_local",
]
