"""fedmqtt edge agent: the device side of asynchronous federated learning over MQTT.

``edge-agent run --config agent.toml`` receives the signed global model, trains on local data
and publishes a signed, encoded update through a durable outbox (see docs/agent.md).

Importing this package is deliberately cheap: it loads nothing but this docstring. The
modules import only numpy, msgpack, paho-mqtt, PyNaCl (the model's Ed25519 signature, the
update MAC) and the standard library -- not even all of what paho imports (see
:mod:`edge_agent.lazyimport`); scikit-learn, onnx and onnxruntime are never imported by the
agent (only ``edge-agent predict`` loads onnxruntime, lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["AgentConfig", "EdgeAgent", "load_config"]

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent
    from edge_agent.config import AgentConfig, load_config


def __getattr__(name: str) -> Any:
    """Lazy re-exports, so ``import edge_agent`` stays light."""
    if name == "EdgeAgent":
        from edge_agent.agent import EdgeAgent

        return EdgeAgent
    if name in ("AgentConfig", "load_config"):
        from edge_agent import config

        return getattr(config, name)
    raise AttributeError(f"module 'edge_agent' has no attribute {name!r}")
