"""MQTT topic names: the one place that knows the topic layout.

```
fl/<fed>/updates/<device>   device -> aggregator, QoS 1, never retained
fl/<fed>/model              aggregator -> devices, QoS 1, retained, signed; fetched on demand
fl/<fed>/announce           aggregator -> devices, QoS 1, retained, signed: the newest version
fl/<fed>/keyframe           aggregator -> devices, QoS 1, retained, signed: the newest keyframe
fl/<fed>/delta/<K>          aggregator -> devices, QoS 1, retained, signed: newest version as
                            a delta from keyframe version K; fetched on demand
fl/<fed>/spec               aggregator -> devices, QoS 1, retained, signed: the model spec
fl/<fed>/model/onnx         aggregator -> devices, QoS 1, retained, signed
fl/<fed>/plan               aggregator -> devices, QoS 1, retained, signed
fl/<fed>/status/<device>    device presence (online / last-will offline), retained
fl/<fed>/eval/<device>      device -> aggregator, QoS 1, never retained: evaluation reports
fl/<fed>/metrics            aggregator metrics snapshot, retained
```

Federation and device ids are single topic levels (:func:`check_id`); any valid id works,
including the layout's own words (a federation named ``status`` or ``updates``). Topics are
parsed here and only here (:func:`device_topic`), level by level.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

from fedmqtt.errors import ConfigError

PREFIX: Final = "fl"
UPDATES: Final = "updates"
STATUS: Final = "status"
EVAL: Final = "eval"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# The shared-subscription group scale-out workers use unless configured: public, so fit only
# for a broker without accounts (development). Mosquitto 2.0 does not check a SUBSCRIBE against
# its ACL file: any client that can log in may join a group whose name it knows and take a share
# of the updates, which the broker then drops at the ACL check (docs/security.md, ACL).
PUBLIC_SHARED_GROUP: Final = "fedmqtt-aggregators"


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it is a safe topic level (no wildcards, slashes or '$'), else raise."""
    if _ID.fullmatch(value) is None:
        raise ConfigError(
            f"{kind} {value!r} is not valid: use 1-64 characters of letters, digits, '_', '.', '-',"
            " starting with a letter or digit"
        )
    return value


def updates(fed: str, device: str) -> str:
    return f"{PREFIX}/{fed}/{UPDATES}/{device}"


def updates_filter(fed: str) -> str:
    return f"{PREFIX}/{fed}/{UPDATES}/+"


def new_shared_group() -> str:
    """A shared-subscription group name nobody can guess: 128 random bits, a valid topic level
    (hex digits after a prefix: no ``+``, ``#``, ``/``, and it passes :func:`check_id`)."""
    return f"fedmqtt-{secrets.token_hex(16)}"


def shared_updates_filter(group: str, fed: str) -> str:
    """MQTT 5 shared subscription: the broker splits updates between group members."""
    return f"$share/{group}/{updates_filter(fed)}"


def update_filters_of_other_configs(group: str, fed: str) -> list[str]:
    """The update filters an aggregator session may hold from another configuration: the plain
    filter (no workers) and the public shared group, next to the one in use. A session that
    changes configuration drops the others, else the broker delivers each update twice."""
    return [updates_filter(fed), shared_updates_filter(PUBLIC_SHARED_GROUP, fed)]


def model(fed: str) -> str:
    return f"{PREFIX}/{fed}/model"


def announce(fed: str) -> str:
    return f"{PREFIX}/{fed}/announce"


def keyframe(fed: str) -> str:
    return f"{PREFIX}/{fed}/keyframe"


def delta(fed: str, base: int) -> str:
    """The delta from keyframe version ``base`` to the newest version."""
    return f"{PREFIX}/{fed}/delta/{int(base)}"


def delta_filter(fed: str) -> str:
    return f"{PREFIX}/{fed}/delta/+"


def delta_base(topic: str, fed: str) -> int | None:
    """The keyframe version of ``fl/<fed>/delta/<K>``, else None."""
    head = f"{PREFIX}/{fed}/delta/"
    rest = topic.removeprefix(head)
    if rest == topic or not rest.isascii() or not rest.isdigit() or len(rest) > 18:
        return None
    return int(rest)


def spec(fed: str) -> str:
    return f"{PREFIX}/{fed}/spec"


def model_onnx(fed: str) -> str:
    return f"{PREFIX}/{fed}/model/onnx"


def plan(fed: str) -> str:
    return f"{PREFIX}/{fed}/plan"


def status(fed: str, device: str) -> str:
    return f"{PREFIX}/{fed}/{STATUS}/{device}"


def status_filter(fed: str) -> str:
    return f"{PREFIX}/{fed}/{STATUS}/+"


def eval_report(fed: str, device: str) -> str:
    return f"{PREFIX}/{fed}/{EVAL}/{device}"


def eval_filter(fed: str) -> str:
    return f"{PREFIX}/{fed}/{EVAL}/+"


def metrics(fed: str) -> str:
    return f"{PREFIX}/{fed}/metrics"


def device_topic(topic: str, fed: str) -> tuple[str, str] | None:
    """``(kind, device)`` of ``fl/<fed>/updates/<device>`` (kind :data:`UPDATES`),
    ``fl/<fed>/status/<device>`` (:data:`STATUS`) or ``fl/<fed>/eval/<device>`` (:data:`EVAL`),
    else None: exactly four levels, federation
    ``fed`` (a valid id, see :func:`check_id`) and a valid device id. The one topic parser."""
    parts = topic.split("/")
    if (
        len(parts) == 4
        and parts[1] == fed
        and parts[0] == PREFIX
        and parts[2] in (UPDATES, STATUS, EVAL)
        and _ID.fullmatch(parts[3]) is not None
    ):
        return parts[2], parts[3]
    return None


def update_device(topic: str, fed: str) -> str | None:
    """The device of ``fl/<fed>/updates/<device>``, else None."""
    t = device_topic(topic, fed)
    return t[1] if t is not None and t[0] == UPDATES else None


def status_device(topic: str, fed: str) -> str | None:
    """The device of ``fl/<fed>/status/<device>``, else None."""
    t = device_topic(topic, fed)
    return t[1] if t is not None and t[0] == STATUS else None


def eval_device(topic: str, fed: str) -> str | None:
    """The device of ``fl/<fed>/eval/<device>``, else None."""
    t = device_topic(topic, fed)
    return t[1] if t is not None and t[0] == EVAL else None
