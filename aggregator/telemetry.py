"""Per-device telemetry: what the aggregator knows of each enrolled device.

For every device with an enrolled key: online or offline (its signed presence) and when it was
last heard from (any message: update, evaluation report, presence), the last version it
trained on (the base version of its last accepted update), updates accepted and refused by
reason, mean staleness of its accepted updates, its last evaluation report, the agent version
it reports, and its tags (``<devices_dir>/<device id>.tags``, a JSON object written at
enrolment; empty if there is none).

Only enrolled devices get a record: a message naming an unknown device id is counted
fleet-wide only, so a flood of invented ids cannot grow this table.

The table, with the federated evaluation's reports (:mod:`aggregator.fedeval`), is kept in
``<state_dir>/fleet.json``, written atomically (temporary file, fsync, rename) at most every
30 s (``aggregator.service.FLEET_SAVE_S``) while something changed, and at a clean stop: it
survives a restart. Counters can be slightly off after a crash (a buffered update redelivered
by the broker is counted again; up to 30 s of telemetry is lost).

Thread safety: the engine thread records; any thread may read.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from aggregator.devices import DeviceKeys
from fedmqtt.cohort import TAGS_SUFFIX, read_tags_file
from fedmqtt.errors import ConfigError, FedMQTTError
from fedmqtt.fedeval import EvalReport
from fedmqtt.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)

FLEET_FILE: Final = "fleet.json"
FLEET_FORMAT: Final = 1


@dataclass
class DeviceRecord:
    online: bool | None = None  # None: no presence message seen
    last_seen: float | None = None  # wall-clock time
    last_trained_version: int | None = None
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    staleness_sum: int = 0
    last_eval: dict[str, Any] | None = None
    agent: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "online": self.online,
            "last_seen": self.last_seen,
            "last_trained_version": self.last_trained_version,
            "accepted": self.accepted,
            "rejected": dict(sorted(self.rejected.items())),
            "staleness_sum": self.staleness_sum,
            "last_eval": self.last_eval,
            "agent": self.agent,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceRecord:
        online = d.get("online")
        seen = d.get("last_seen")
        trained = d.get("last_trained_version")
        last_eval = d.get("last_eval")
        return cls(
            online=bool(online) if online is not None else None,
            last_seen=float(seen) if seen is not None else None,
            last_trained_version=int(trained) if trained is not None else None,
            accepted=int(d.get("accepted", 0)),
            rejected={str(k): int(v) for k, v in dict(d.get("rejected", {})).items()},
            staleness_sum=int(d.get("staleness_sum", 0)),
            last_eval=dict(last_eval) if isinstance(last_eval, dict) else None,
            agent=str(d.get("agent", "")),
        )


class DeviceTelemetry:
    def __init__(self, keys: DeviceKeys) -> None:
        self.keys = keys
        self._lock = threading.Lock()
        self._devices: dict[str, DeviceRecord] = {}
        self.changed = False

    def _record(self, device: str) -> DeviceRecord | None:
        rec = self._devices.get(device)
        if rec is None:
            if self.keys.get(device) is None:
                return None
            rec = self._devices[device] = DeviceRecord()
        return rec

    # ------------------------------------------------------------------ recording
    def accepted(self, device: str, tau: int, base_version: int, now: float) -> None:
        with self._lock:
            rec = self._record(device)
            if rec is None:
                return
            rec.accepted += 1
            rec.staleness_sum += tau
            rec.last_seen = now
            if rec.last_trained_version is None or base_version > rec.last_trained_version:
                rec.last_trained_version = base_version
            self.changed = True

    def rejected(self, device: str, reason: str, now: float) -> None:
        with self._lock:
            rec = self._record(device)
            if rec is None:
                return
            rec.rejected[reason] = rec.rejected.get(reason, 0) + 1
            rec.last_seen = now
            self.changed = True

    def presence(self, device: str, state: str | None, now: float) -> None:
        with self._lock:
            rec = self._record(device)
            if rec is None:
                return
            rec.online = None if state is None else state == "online"
            rec.last_seen = now
            self.changed = True

    def evaluated(self, report: EvalReport, now: float) -> None:
        with self._lock:
            rec = self._record(report.sender)
            if rec is None:
                return
            rec.last_eval = {
                "version": report.version,
                "samples": report.num_samples,
                "loss": round(report.loss, 6),
                **{k: round(v, 6) for k, v in sorted(report.metrics.items())},
            }
            rec.agent = report.agent
            rec.last_seen = now
            self.changed = True

    # ------------------------------------------------------------------ views
    def listing(self, *, limit: int | None = None) -> dict[str, dict[str, Any]]:
        """Every known device (the ``limit`` most recently seen), with its tags and mean
        staleness, by device id."""
        with self._lock:
            items = [(d, r.to_dict()) for d, r in self._devices.items()]
        if limit is not None and len(items) > limit:
            items.sort(key=lambda it: it[1]["last_seen"] or 0.0, reverse=True)
            items = items[:limit]
        return {d: describe(d, r, self.keys.directory) for d, r in sorted(items)}

    def count(self) -> int:
        with self._lock:
            return len(self._devices)

    def to_state(self) -> dict[str, Any]:
        with self._lock:
            self.changed = False
            return {d: r.to_dict() for d, r in sorted(self._devices.items())}

    def restore(self, state: dict[str, Any]) -> None:
        devices = {str(d): DeviceRecord.from_dict(dict(r)) for d, r in state.items()}
        with self._lock:
            self._devices = devices


def describe(device: str, rec: dict[str, Any], devices_dir: Path) -> dict[str, Any]:
    """A device's record as listed: with its mean staleness and tags."""
    out = dict(rec)
    n = int(rec.get("accepted", 0))
    out["mean_staleness"] = round(rec.get("staleness_sum", 0) / n, 3) if n else None
    out.pop("staleness_sum", None)
    out["tags"] = read_tags(devices_dir, device)
    return out


def read_tags(devices_dir: Path, device: str) -> dict[str, str]:
    """The device's tags from ``<devices_dir>/<device>.tags`` ({} if there are none, or if
    :func:`fedmqtt.cohort.read_tags_file` refuses them, which is logged)."""
    path = devices_dir / f"{device}{TAGS_SUFFIX}"
    try:
        return read_tags_file(path)
    except ConfigError as e:
        log.warning("device %s: ignoring its tags: %s", device, e)
        return {}


# --------------------------------------------------------------------------- the fleet file


def save_fleet(state_dir: Path, devices: dict[str, Any], evaluation: dict[str, Any]) -> None:
    """Write ``<state_dir>/fleet.json`` atomically."""
    doc = {
        "format": FLEET_FORMAT,
        "saved_at": time.time(),
        "devices": devices,
        "evaluation": evaluation,
    }
    atomic_write_bytes(state_dir / FLEET_FILE, json.dumps(doc, sort_keys=True).encode(), mode=0o600)


def load_fleet(state_dir: Path) -> dict[str, Any] | None:
    """The fleet file's content, or None if there is none or it is unusable (logged)."""
    path = state_dir / FLEET_FILE
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return None
    if not isinstance(doc, dict) or doc.get("format") != FLEET_FORMAT:
        log.warning("ignoring %s: not a fleet file of format %d", path, FLEET_FORMAT)
        return None
    return doc


def read_devices(state_dir: Path, devices_dir: Path) -> dict[str, dict[str, Any]]:
    """Every device of the fleet file, as :meth:`DeviceTelemetry.listing` lists it; FedMQTTError
    if there is no fleet file (the service has not written one yet)."""
    doc = load_fleet(state_dir)
    if doc is None:
        raise FedMQTTError(
            f"no usable {state_dir / FLEET_FILE}: the aggregator has not run with this state "
            "directory yet (it writes the file every [metrics] status_interval_s)"
        )
    devices = dict(doc.get("devices", {}))
    return {d: describe(d, dict(r), devices_dir) for d, r in sorted(devices.items())}


def format_devices(devices: dict[str, dict[str, Any]], now: float) -> str:
    """One line per device, for ``fl-aggregator devices``."""
    head = (
        f"{'device':<20} {'state':<8} {'seen':>8} {'trained':>7} {'accepted':>8} "
        f"{'stale':>5}  {'evaluation':<34} {'agent':<8} rejected / tags"
    )
    lines = [head]
    for device, d in devices.items():
        state = {True: "online", False: "offline", None: "-"}[d.get("online")]
        seen = d.get("last_seen")
        ago = _ago(now - seen) if seen is not None else "never"
        trained = d.get("last_trained_version")
        stale = d.get("mean_staleness")
        ev = d.get("last_eval")
        if ev:
            figures = " ".join(
                f"{k} {v:.3f}" for k, v in ev.items() if k not in ("version", "samples")
            )
            evaluation = f"v{ev['version']} {figures} n={ev['samples']}"
        else:
            evaluation = "-"
        rejected = ",".join(f"{k}={v}" for k, v in d.get("rejected", {}).items()) or "-"
        tags = ",".join(f"{k}={v}" for k, v in d.get("tags", {}).items()) or "-"
        lines.append(
            f"{device:<20} {state:<8} {ago:>8} {'-' if trained is None else trained:>7} "
            f"{d.get('accepted', 0):>8} {'-' if stale is None else f'{stale:.1f}':>5}  "
            f"{evaluation:<34} {d.get('agent') or '-':<8} {rejected} / {tags}"
        )
    lines.append(f"{len(devices)} device(s)")
    return "\n".join(lines)


def _ago(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.0f}h"
