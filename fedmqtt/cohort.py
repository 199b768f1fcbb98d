"""Cohorts: which devices train on a global version, and which only evaluate it.

The plan (``[plan.selection]`` of the aggregator, signed and retained on the plan topic)
carries a :class:`Selection`. A device is *eligible* when the selection names no devices and no
tags, when its id is in ``devices``, or when its tags match ``tags``; an eligible device
*trains* on version ``v`` when its participation draw for the window of ``v`` is below
``participation``. Every other device only evaluates.

The draw is a hash, not a random number: ``sha256(federation, device id, window index)`` read as
a fraction in [0, 1), with ``window index = v // window``. So a device decides alone (it knows
its id, its federation and the plan), the aggregator checks the same decision for every update
(an update trained on base version ``b`` is judged by the window of ``b``, whatever the current
version is when it arrives), and over windows each device trains about ``participation`` of the
time. The same federation, device and window always give the same answer.

Tag selectors are ``key=value`` strings. Selectors with the same key are alternatives, selectors
with different keys must all match: ``["site=north", "site=south", "hw=pi4"]`` selects the
Raspberry Pi 4s of both sites. A device's tags are set at enrolment (``fedmqtt-admin enroll
--tag site=north``): in its ``agent.toml`` (``[device] tags``) and, for the aggregator, in
``<devices_dir>/<device id>.tags`` (a JSON object, :func:`read_tags_file`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from fedmqtt.errors import SCHEMA, ConfigError, DecodeError
from fedmqtt.tomltable import Table
from fedmqtt.topics import check_id

TAGS_SUFFIX: Final = ".tags"  # <devices_dir>/<device id>.tags, next to its key
_TAG_KEY: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")  # a bare TOML key
_TAG_VALUE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_TAGS: Final = 32  # per device, and selectors per plan
MAX_DEVICES: Final = 10_000  # explicit device ids per plan
MAX_WINDOW: Final = 1_000_000
_SCALE: Final = float(1 << 64)


def check_tag(key: str, value: str) -> None:
    """ConfigError unless ``key`` (letters, digits, ``_-``) and ``value`` (also ``.:``) are
    short words starting with a letter or digit."""
    if not _TAG_KEY.match(key):
        raise ConfigError(f"tag key {key[:80]!r} must be 1-64 letters, digits, _ or -")
    if not _TAG_VALUE.match(value):
        raise ConfigError(f"tag value {value[:80]!r} must be 1-64 letters, digits, _ . : or -")


def parse_tag(text: str) -> tuple[str, str]:
    """``"site=north"`` -> ``("site", "north")``; ConfigError if it is not ``key=value``."""
    key, sep, value = text.partition("=")
    if not sep:
        raise ConfigError(f"tag {text[:80]!r} must be key=value, e.g. site=north")
    check_tag(key, value)
    return key, value


def tag_map(items: Iterable[str]) -> dict[str, str]:
    """Tags given as ``key=value`` strings (each key once) as a map."""
    out: dict[str, str] = {}
    for item in items:
        key, value = parse_tag(item)
        if key in out:
            raise ConfigError(f"tag {key!r} given twice")
        out[key] = value
    if len(out) > MAX_TAGS:
        raise ConfigError(f"at most {MAX_TAGS} tags per device")
    return out


def check_tag_map(raw: object) -> dict[str, str]:
    """A device's tags read from a config file or a tags file: a map of words to words."""
    if not isinstance(raw, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in raw.items()
    ):
        raise ConfigError('tags must be a table of text values, e.g. { site = "north" }')
    if len(raw) > MAX_TAGS:
        raise ConfigError(f"at most {MAX_TAGS} tags per device")
    for k, v in raw.items():
        check_tag(k, v)
    return dict(sorted(raw.items()))


def tags_file_bytes(tags: Mapping[str, str]) -> bytes:
    """The content of a device's ``.tags`` file."""
    return (json.dumps(dict(sorted(tags.items())), sort_keys=True) + "\n").encode()


def read_tags_file(path: Path) -> dict[str, str]:
    """A device's tags from its ``.tags`` file ({} if there is none); ConfigError if unusable."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {path}: {e}") from None
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ConfigError(f"{path}: not JSON ({e})") from None
    try:
        return check_tag_map(raw)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


@dataclass(frozen=True)
class Selection:
    """Who trains on which version (the plan's ``selection``); the default selects everyone."""

    tags: tuple[str, ...] = ()  # "key=value" selectors
    devices: tuple[str, ...] = ()  # device ids selected whatever their tags
    participation: float = 1.0  # the fraction of eligible devices that train per window
    window: int = 1  # versions per participation window

    def __post_init__(self) -> None:
        if not 0.0 <= self.participation <= 1.0:
            raise ConfigError("participation must be a fraction between 0 and 1")
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigError(f"window must be 1-{MAX_WINDOW} versions")
        if len(self.tags) > MAX_TAGS or len(self.devices) > MAX_DEVICES:
            raise ConfigError(f"at most {MAX_TAGS} tag selectors and {MAX_DEVICES} device ids")
        for t in self.tags:
            parse_tag(t)

    @property
    def everyone(self) -> bool:
        """Whether every device trains on every version (no selection at all)."""
        return not self.tags and not self.devices and self.participation >= 1.0

    def eligible(self, device: str, tags: Mapping[str, str]) -> bool:
        """Whether ``device`` (with ``tags``) is in the cohort, before participation."""
        if not self.tags and not self.devices:
            return True
        if device in self.devices:
            return True
        if not self.tags:
            return False
        wanted: dict[str, set[str]] = {}
        for sel in self.tags:
            key, value = parse_tag(sel)
            wanted.setdefault(key, set()).add(value)
        return all(tags.get(key) in values for key, values in wanted.items())

    def window_of(self, version: int) -> int:
        return version // self.window

    def trains(self, federation: str, device: str, tags: Mapping[str, str], version: int) -> bool:
        """Whether ``device`` trains on (an update based on) ``version``."""
        if not self.eligible(device, tags):
            return False
        if self.participation >= 1.0:
            return True
        return draw(federation, device, self.window_of(version)) < self.participation

    def evaluates(
        self, federation: str, device: str, tags: Mapping[str, str], version: int
    ) -> bool:
        """Whether a device that does not train on ``version`` fetches it to evaluate it, when
        its federated evaluation is on. A device of the cohort does not: it evaluates the
        versions it trains on (before training), which are a fair sample of its windows. A
        device outside the cohort, which never trains, evaluates in the windows its
        participation draw selects (every window at participation 1), so it downloads no
        more than a device of the cohort; the agent fetches one version per such window."""
        if self.eligible(device, tags):
            return False
        if self.participation >= 1.0:
            return True
        return draw(federation, device, self.window_of(version)) < self.participation

    def why_not(
        self, federation: str, device: str, tags: Mapping[str, str], version: int
    ) -> str | None:
        """None if ``device`` trains on ``version``, else the reason in words."""
        if not self.eligible(device, tags):
            return "not in the plan's cohort (device list / tag selectors)"
        if not self.trains(federation, device, tags, version):
            return (
                f"not drawn for participation window {self.window_of(version)} "
                f"(fraction {self.participation:g}, {self.window} version(s) per window)"
            )
        return None

    def to_wire(self) -> dict[str, Any]:
        return {
            "tags": list(self.tags),
            "devices": list(self.devices),
            "participation": self.participation,
            "window": self.window,
        }

    @classmethod
    def from_wire(cls, m: object) -> Selection:
        """A plan's ``selection`` map; DecodeError(SCHEMA) if malformed."""
        if not isinstance(m, Mapping):
            raise DecodeError(SCHEMA, "plan selection must be a map")
        tags, devices = m.get("tags"), m.get("devices")
        part, window = m.get("participation"), m.get("window")
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise DecodeError(SCHEMA, "plan selection tags must be a list of strings")
        if not isinstance(devices, list) or not all(isinstance(d, str) for d in devices):
            raise DecodeError(SCHEMA, "plan selection devices must be a list of strings")
        if isinstance(part, bool) or not isinstance(part, (int, float)):
            raise DecodeError(SCHEMA, "plan selection participation must be a number")
        if isinstance(window, bool) or not isinstance(window, int):
            raise DecodeError(SCHEMA, "plan selection window must be an integer")
        try:
            return cls(tuple(tags), tuple(devices), float(part), window)
        except ConfigError as e:
            raise DecodeError(SCHEMA, f"plan selection: {e}") from None

    def describe(self) -> str:
        if self.everyone:
            return "every device trains"
        parts = []
        if self.devices:
            parts.append(f"{len(self.devices)} listed device(s)")
        if self.tags:
            parts.append("tags " + ",".join(self.tags))
        who = " or ".join(parts) if parts else "every device"
        return f"{who}; participation {self.participation:g} per {self.window}-version window"


EVERYONE: Final = Selection()


def draw(federation: str, device: str, window_index: int) -> float:
    """The device's participation draw for a window: a fraction in [0, 1), the same wherever
    it is computed (the device and the aggregator)."""
    h = hashlib.sha256(f"fedmqtt-cohort\0{federation}\0{device}\0{window_index}".encode())
    return int.from_bytes(h.digest()[:8], "big") / _SCALE


def read_selection(t: Table) -> Selection:
    """``[plan.selection]``: ``tags``, ``devices``, ``participation``, ``window``."""
    d = EVERYONE
    out: dict[str, Any] = {}
    for key in ("tags", "devices"):
        items = t.raw(key, [])
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise t.error(key, "must be a list of strings")
        out[key] = tuple(items)
    for dev in out["devices"]:
        try:
            check_id("device id", dev)
        except ConfigError as e:
            raise t.error("devices", str(e)) from None
    out["participation"] = t.number("participation", d.participation, lo=0.0, hi=1.0)
    out["window"] = t.integer("window", d.window, lo=1, hi=MAX_WINDOW)
    t.done()
    try:
        return Selection(**out)
    except ConfigError as e:
        raise t.error("tags", str(e)) from None
