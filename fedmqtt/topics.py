"""MQTT topic names: the one place that knows the topic layout.

```
fl/<fed>/updates/<device>   device -> aggregator, QoS 1, never retained
fl/<fed>/model              aggregator -> devices, QoS 1, retained, signed; fetched on demand
fl/<fed>/announce           aggregator -> devices, QoS 1, retained, signed: the newest version
fl/<fed>/spec               aggregator -> devices, QoS 1, retained, signed: the model spec
fl/<fed>/model/onnx         aggregator -> devices, QoS 1, retained, signed
fl/<fed>/plan               aggregator -> devices, QoS 1, retained, signed
fl/<fed>/status/<device>    device presence (online / last-will offline), retained
fl/<fed>/metrics            aggregator metrics snapshot, retained
```
"""

from __future__ import annotations

import re

from fedmqtt.errors import ConfigError

PREFIX = "fl"
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe topic level (no wildcards, slashes or '$'), else raise."""
    if not _ID.match(value):
        raise ConfigError(
            f"{kind} {value!r} is not valid: use 1-64 characters of letters, digits, '_', '.', '-',"
            " starting with a letter or digit"
        )
    return value


def updates(fed: str, device: str) -> str:
    return f"{PREFIX}/{fed}/updates/{device}"


def updates_filter(fed: str) -> str:
    return f"{PREFIX}/{fed}/updates/+"


def shared_updates_filter(group: str, fed: str) -> str:
    """MQTT 5 shared subscription: the broker splits updates between group members."""
    return f"$share/{group}/{updates_filter(fed)}"


def model(fed: str) -> str:
    return f"{PREFIX}/{fed}/model"


def announce(fed: str) -> str:
    return f"{PREFIX}/{fed}/announce"


def spec(fed: str) -> str:
    return f"{PREFIX}/{fed}/spec"


def model_onnx(fed: str) -> str:
    return f"{PREFIX}/{fed}/model/onnx"


def plan(fed: str) -> str:
    return f"{PREFIX}/{fed}/plan"


def status(fed: str, device: str) -> str:
    return f"{PREFIX}/{fed}/status/{device}"


def status_filter(fed: str) -> str:
    return f"{PREFIX}/{fed}/status/+"


def metrics(fed: str) -> str:
    return f"{PREFIX}/{fed}/metrics"


def device_of(topic: str) -> str | None:
    """The last level of an updates/status topic, or None if the topic is not one."""
    parts = topic.split("/")
    if len(parts) == 4 and parts[0] == PREFIX and parts[2] in ("updates", "status"):
        return parts[3]
    return None
