"""How big the broker must let packets be, from the model's size.

The largest messages are the aggregator's: the global model with raw float32 weights, and its
ONNX export, which carries the same weights. A device's update is at most that big (``raw``
codec) and usually far smaller. So one limit, derived from the model, serves both directions:

    message  <= 4 * parameters + 32 * input features + 16 KiB
    packet   <= message + 1 KiB

4 bytes per float32 weight; the spec repeats per-feature preprocessing constants (offset and
scale as msgpack float64, 9 bytes each, plus an optional feature name); 16 KiB covers the
signature header, spec, stats and per-tensor headers, and the ONNX graph's nodes and names;
1 KiB covers the MQTT fixed header, topic name and MQTT 5 properties. The result is rounded up
to 64 KiB. ``tests/test_broker_security.py`` encodes real models and checks they fit.
"""

from __future__ import annotations

from typing import Final

from fedmqtt.models.spec import ModelSpec

BYTES_PER_PARAM: Final = 4
BYTES_PER_FEATURE: Final = 32
MESSAGE_OVERHEAD: Final = 16 * 1024
PACKET_OVERHEAD: Final = 1024
ROUND: Final = 64 * 1024
# MQTT's own ceiling (remaining length is at most 268,435,455 bytes).
MQTT_MAX_PACKET: Final = 268_435_455 + 5


def max_message_bytes(n_params: int, n_features: int = 0) -> int:
    """Upper bound on the payload of any fedmqtt message for this model."""
    if n_params <= 0 or n_features < 0:
        raise ValueError("a model has a positive number of parameters")
    return BYTES_PER_PARAM * n_params + BYTES_PER_FEATURE * n_features + MESSAGE_OVERHEAD


def max_packet_size(n_params: int, n_features: int = 0) -> int:
    """The broker's ``max_packet_size`` for this model."""
    raw = max_message_bytes(n_params, n_features) + PACKET_OVERHEAD
    size = -(-raw // ROUND) * ROUND
    if size > MQTT_MAX_PACKET:
        raise ValueError(
            f"a model of {n_params} parameters does not fit in one MQTT packet ({size} bytes)"
        )
    return size


def for_spec(spec: ModelSpec) -> int:
    return max_packet_size(spec.layout().size, spec.n_features)
