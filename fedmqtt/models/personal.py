"""Personalisation on the device: a personal copy of the global model, for this device's data.

Under skewed data (each device sees its own machine, room or user) one global model serves
some devices badly. A personalising device keeps, next to the global model it trains for the
federation, a personal model used only by its own predictor. Two modes:

* ``finetune``: the personal model is the global version plus the local fine-tuning steps the
  device just ran on its own data for its update (the round's locally trained model). It costs
  no extra training; it forgets everything personal when the next global version arrives.
* ``head``: the global body (every layer but the last) with the device's own head (the last
  layer), in the spirit of FedPer (Arivazhagan et al., arXiv:1912.00818) and FedRep (Collins
  et al., ICML 2021). On each new global version the head, starting from the device's previous
  head, is trained for ``head_epochs`` epochs on the outputs of the frozen global body; so the
  head keeps what it learnt across versions. For the one-layer kinds (softmax, linear) the
  body is only the feature scaling and the whole model is the head: it starts from the first
  global model and then keeps learning on the device alone.

Supervised kinds only (:data:`fedmqtt.personalise.KINDS`, with the options' names and
defaults). Pure numpy: no I/O here (the agent stores the personal model,
:mod:`edge_agent.personal`).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from fedmqtt.models.dense import check_params, hidden_features
from fedmqtt.models.spec import ModelSpec
from fedmqtt.models.train import TrainConfig, train_local
from fedmqtt.params import Params
from fedmqtt.personalise import KINDS
from fedmqtt.rand import RandomSource


def head_names(spec: ModelSpec) -> tuple[str, str]:
    """The names of the last layer's weight and bias (the head)."""
    last = len(spec.hidden)
    return f"W{last}", f"b{last}"


def head_spec(spec: ModelSpec) -> ModelSpec:
    """A one-layer model of the head: the last layer, on the body's outputs as its features
    (already scaled, so no preprocessing of its own)."""
    w, _ = head_names(spec)
    fan_in = spec.param_shapes()[w][0]
    if spec.is_classifier:
        return ModelSpec("softmax", fan_in, spec.n_outputs, classes=spec.classes)
    return ModelSpec("linear", fan_in, spec.n_outputs)


def train_head(
    spec: ModelSpec,
    global_params: Params,
    previous: Params | None,
    X: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    config: TrainConfig,
    rng: RandomSource,
) -> Params:
    """The personal model of ``head`` mode: ``global_params``' body with a head trained on
    ``(X, y)`` for ``config.epochs`` epochs, starting from ``previous``'s head (the global
    head if ``previous`` is None or does not fit ``spec``). Inputs are not modified."""
    if spec.kind not in KINDS:
        raise ValueError(f"a {spec.kind} model cannot be personalised")
    check_params(spec, global_params)
    w, b = head_names(spec)
    start = global_params
    if previous is not None:
        try:
            check_params(spec, previous)
        except ValueError:
            previous = None  # the architecture changed: start again from the global head
        else:
            start = previous
    hs = head_spec(spec)
    features = hidden_features(spec, global_params, X)
    head = {"W0": np.array(start[w], dtype=np.float32), "b0": np.array(start[b], np.float32)}
    trained, _ = train_local(hs, head, features, y, config, rng)
    out: Params = {k: np.array(v, dtype=np.float32) for k, v in global_params.items()}
    out[w], out[b] = trained["W0"], trained["b0"]
    return out
