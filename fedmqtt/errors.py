"""One exception family for everything fedmqtt refuses.

Every rejection of untrusted input carries a short machine-readable ``reason`` so that the
aggregator and agent can count rejections by reason (metrics, logs, the simulator's summary)
without parsing messages.
"""

from __future__ import annotations

from typing import Final

# Reasons an input is refused. They are metric label values: keep them short and stable.
SIZE: Final = "size"  # payload or declared tensor larger than a hard limit
SCHEMA: Final = "schema"  # not msgpack, unknown version/type, missing field, wrong type
CODEC: Final = "codec"  # unknown codec or inconsistent codec fields
NONFINITE: Final = "nonfinite"  # NaN or Inf in a tensor
SIGNATURE: Final = "signature"  # bad or missing signature / MAC
UNKNOWN_DEVICE: Final = "unknown_device"  # no enrolled key for the sender
SENDER_MISMATCH: Final = "sender_mismatch"  # body sender differs from the topic's device
FEDERATION: Final = "federation"  # message for another federation
REPLAY: Final = "replay"  # update_id already applied
SPEC: Final = "spec"  # update trained for another model spec
SHAPE: Final = "shape"  # tensor names or shapes differ from the model spec
STALE: Final = "stale"  # staleness above max_staleness
FUTURE: Final = "future"  # base_version newer than the current global version
NORM: Final = "norm"  # update norm above the accepted bound
RATE_LIMITED: Final = "rate_limited"  # the device sends faster than its per-device rate
DEVICE_QUOTA: Final = "device_quota"  # the device already holds its rows in this buffer/window
SUPERSEDED: Final = "superseded"  # over DEVICE_QUOTA, and a later update of the device is held
NOT_SELECTED: Final = "not_selected"  # the plan's selection does not let the device train then
PRIVACY_BUDGET: Final = "privacy_budget"  # the device (or, on_budget = stop, any) spent its ε
# Device side only (not an update rejection): a model that names a spec the device does not hold.
UNKNOWN_SPEC: Final = "unknown_spec"
# Not a rejection: an update over DEVICE_QUOTA held for the next buffer (aggregator.engine); the
# aggregator's update observer sees it again when it is accepted or refused there.
HELD: Final = "held"

REASONS: Final = (
    SIZE,
    SCHEMA,
    CODEC,
    NONFINITE,
    SIGNATURE,
    UNKNOWN_DEVICE,
    SENDER_MISMATCH,
    FEDERATION,
    REPLAY,
    SPEC,
    SHAPE,
    STALE,
    FUTURE,
    NORM,
    RATE_LIMITED,
    DEVICE_QUOTA,
    SUPERSEDED,
    NOT_SELECTED,
    PRIVACY_BUDGET,
)


class FedMQTTError(Exception):
    """Base class of every error fedmqtt raises on purpose."""


class ConfigError(FedMQTTError):
    """A configuration file or option is wrong; the message says which and how to fix it."""


class RejectedError(FedMQTTError):
    """Input from the network was refused; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class DecodeError(RejectedError):
    """Bytes could not be decoded into a valid message or tensor.

    Decoders raise only this (never KeyError, ValueError, MemoryError, ...), whatever the input.
    """
