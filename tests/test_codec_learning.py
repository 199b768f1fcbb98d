"""What compression costs in accuracy, without timing noise.

Twenty digits shards (Dirichlet 0.5) train in lock-step rounds, each delta going through the
real codec (with its per-device error feedback) and the real FedBuff mean; only the broker and
the clocks are left out, so the comparison is deterministic. The system-level, wall-clock view
of the same question is bench/bytes_to_accuracy.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from fedmqtt.aggregation import fedbuff_aggregate
from fedmqtt.codecs import Codec, ErrorFeedback, decode_params, encode_params
from fedmqtt.downlink import encode_model
from fedmqtt.models import TrainConfig, build_model, init_params, train_local
from fedmqtt.models.spec import ModelSpec
from simulator import datasets
from simulator.partition import partition

ROUNDS = 100
Setting = tuple[datasets.Dataset, ModelSpec, list[np.ndarray]]


@pytest.fixture(scope="module")
def setting() -> Setting:
    ds = datasets.load("digits", seed=0)
    spec = ModelSpec(
        "softmax",
        64,
        10,
        classes=tuple(range(10)),
        feature_offset=ds.feature_offset,
        feature_scale=ds.feature_scale,
    )
    return ds, spec, partition(ds.y_train, 20, "dirichlet:0.5", seed=0)


def federated_accuracy(
    setting: Setting,
    codec: str,
    *,
    feedback: bool = True,
    downlink: str = "raw",
    keep_float32: bool = True,
) -> float:
    """Test accuracy after :data:`ROUNDS` rounds. Devices train on the global model as the
    aggregator publishes it in the ``downlink`` codec; the aggregator applies the mean delta
    to its float32 model (``keep_float32``) or, to show what that prevents, to the published
    one."""
    ds, spec, parts = setting
    layout = spec.layout()
    rng = np.random.default_rng(0)
    w = layout.flatten(init_params(spec, rng))
    residuals = [ErrorFeedback() if feedback else None for _ in parts]
    cfg = TrainConfig(epochs=1, lr=0.1, batch_size=16)
    samples = np.array([len(p) for p in parts], dtype=np.float32)
    for version in range(ROUNDS):
        _, sent = encode_model(layout, w, Codec.parse(downlink), seed=0, version=version)
        base = layout.unflatten(sent)
        deltas = np.empty((len(parts), layout.size), np.float32)
        for i, p in enumerate(parts):
            new, _ = train_local(spec, base, ds.X_train[p], ds.y_train[p], cfg, rng)
            delta = {k: new[k] - base[k] for k in base}
            wire_form = encode_params(delta, Codec.parse(codec), rng=rng, feedback=residuals[i])
            deltas[i] = decode_params(wire_form, layout)
        w = (w if keep_float32 else sent) + fedbuff_aggregate(
            deltas, np.ones(len(parts), np.float32), samples
        )
    return float(build_model(spec, layout.unflatten(w)).score(ds.X_test, ds.y_test))


def test_int8_and_topk_with_error_feedback_cost_little(setting: Setting) -> None:
    raw = federated_accuracy(setting, "raw")
    assert raw >= 0.95
    assert federated_accuracy(setting, "int8") >= raw - 0.005
    assert federated_accuracy(setting, "topk:0.01") >= raw - 0.01


def test_topk_without_error_feedback_loses_much_more(setting: Setting) -> None:
    raw = federated_accuracy(setting, "raw")
    without = federated_accuracy(setting, "topk:0.01", feedback=False)
    assert without < raw - 0.05  # measured: about 10 points lost after 100 rounds


def test_a_quantized_downlink_costs_little(setting: Setting) -> None:
    """Devices train on the int8 (or fp16) global model, the aggregator keeps its float32 one:
    measured at the same accuracy as raw both ways (0.967; int8 updates 0.969)."""
    raw = federated_accuracy(setting, "raw")
    assert federated_accuracy(setting, "raw", downlink="fp16") >= raw - 0.005
    assert federated_accuracy(setting, "raw", downlink="int8") >= raw - 0.005
    assert federated_accuracy(setting, "int8", downlink="int8") >= raw - 0.005


def test_int4_both_ways_costs_little(setting: Setting) -> None:
    """int4 updates without error feedback (as agents send them) on int4 global models:
    measured 0.969 after 100 rounds, raw both ways 0.967."""
    raw = federated_accuracy(setting, "raw")
    assert federated_accuracy(setting, "int4", feedback=False, downlink="int4") >= raw - 0.005
