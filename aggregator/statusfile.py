"""``status.json`` in the state directory: what ``fl-aggregator status`` shows.

The running service rewrites it atomically every ``[metrics] status_interval_s`` and at shutdown,
so ``status`` needs neither the broker nor the service's HTTP port, and still shows the last
known state (marked stopped, or stale if the process died) when the service is down.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, cast

from fedmqtt.errors import FedMQTTError

STATUS_FILE = "status.json"


def write_status(state_dir: Path, status: dict[str, Any]) -> None:
    """Replace ``status.json`` atomically (rename) but without fsync: it is informational,
    rewritten every few seconds, and must not compete with checkpoints for the disk."""
    body = dict(status, updated_at=time.time())
    path = state_dir / STATUS_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{STATUS_FILE}.", suffix=".tmp", dir=state_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(json.dumps(body, indent=1, sort_keys=True).encode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_status(state_dir: Path) -> dict[str, Any]:
    path = state_dir / STATUS_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FedMQTTError(
            f"no {path}: the aggregator has not run yet with this state directory"
        ) from None
    except (OSError, ValueError) as e:
        raise FedMQTTError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise FedMQTTError(f"{path} is not a status object")
    return cast(dict[str, Any], data)


def format_status(s: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    age = now - float(s.get("updated_at", 0))
    state = s.get("state", "?")
    if state == "running" and age > 3 * float(s.get("status_interval_s", 5.0)) + 5:
        state = f"not responding (last update {age:.0f}s ago; pid {s.get('pid')})"
    lines = [
        f"federation      {s.get('federation')}",
        f"state           {state}",
        f"fedmqtt         {s.get('fedmqtt_version')}",
        f"model version   {s.get('version')}  (strategy {s.get('strategy')})",
        f"broker          {'connected' if s.get('connected') else 'disconnected'}",
        f"updates         received {s.get('updates_received', 0)}, accepted "
        f"{s.get('accepted', 0)}, rejected {s.get('rejected_total', 0)}",
    ]
    rejected = s.get("rejected") or {}
    if rejected:
        lines.append("  rejected by   " + ", ".join(f"{k} {v}" for k, v in rejected.items()))
    lines.append(f"buffered        {s.get('buffered', 0)}")
    lines.append(f"devices online  {s.get('devices_online', 0)}")
    if s.get("accuracy") is None:
        lines.append("last evaluation none (no [evaluation] holdout, or not yet)")
    else:
        lines.append(
            f"last evaluation {s.get('eval_metric', 'accuracy')} "
            f"{float(s['accuracy']):.4f} at version {s.get('eval_version')}"
        )
    fed = s.get("federated_eval")
    if isinstance(fed, dict):
        lines.append(
            f"federated eval  {fed['metric_name']} {fed['metric']:.4f} (p10 {fed['p10']:.4f}, "
            f"p90 {fed['p90']:.4f}) over {fed['devices']} device(s) at version {fed['version']}"
        )
    if s.get("released_version") is not None:
        score = s.get("released_score")
        text = "" if score is None else f" (score {float(score):.4f})"
        lines.append(f"released        version {s['released_version']}{text} (evaluation gate)")
    rollbacks = s.get("rollbacks") or {}
    if rollbacks:
        lines.append("rollbacks       " + ", ".join(f"{k} {v}" for k, v in rollbacks.items()))
    privacy = s.get("privacy")
    if privacy:
        line = (
            f"privacy         ε {float(privacy['epsilon']):.3f} at δ {privacy['delta']:g} "
            f"(worst-case device, {privacy['worst_device_releases']} releases; central DP)"
        )
        if privacy.get("max_epsilon"):
            line += (
                f", budget {privacy['max_epsilon']:g}: "
                f"{privacy['devices_exhausted']} device(s) spent it"
            )
        if privacy.get("stopped"):
            line += ", training stopped"
        lines.append(line)
    lines.append(f"updated         {age:.1f}s ago")
    return "\n".join(lines)
