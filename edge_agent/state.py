"""The agent's state directory: file names, persisted counters, and an exclusive lock.

Layout (see docs/contracts.md and docs/agent.md)::

    <state_dir>/
      .lock              flock(2) held while an agent runs: two agents on one directory
                         would hand out the same seq and interleave outbox files
      agent.json         AgentState below (atomic JSON)
      global_model.bin   last verified GlobalModel payload, exactly as received (signed)
      keyframe.bin       last verified keyframe (a GlobalModel flagged keyframe, signed)
      global_delta.bin   last verified ModelDelta from that keyframe (signed): with it, the
                         model trained on when it is newer than global_model.bin
      spec-<fp>.bin      verified SpecMessage payloads, by fingerprint: the spec of the stored
                         model and the newest one published (a model names its spec by
                         fingerprint, so it is only usable with its spec)
      plan.bin           last verified Plan payload, as received (signed)
      model.onnx.bin     last verified OnnxModel payload, as received (signed)
      feedback.bin       top-k error-feedback residual (fedmqtt.codecs.ErrorFeedback)
      personal.bin       with [personalise]: the device's personal model (edge_agent.personal;
                         unsigned, never sent)
      outbox/            one file per pending update (edge_agent.outbox)

Every file is written with :func:`fedmqtt.fsutil.atomic_write_bytes`, so a power cut or
SIGKILL leaves the old or the new version of each file, never a torn one. Files are not
updated together atomically; instead the agent writes them in an order whose partial results
are harmless and reconciles ``agent.json`` with the outbox at start (see :meth:`AgentState.
reconcile`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Final

from fedmqtt import wire
from fedmqtt.errors import DecodeError, FedMQTTError
from fedmqtt.fsutil import DirLock, atomic_write_bytes
from fedmqtt.models.spec import ModelSpec
from fedmqtt.signing import Verifier

log = logging.getLogger(__name__)

STATE_FILE: Final = "agent.json"
GLOBAL_MODEL_FILE: Final = "global_model.bin"
KEYFRAME_FILE: Final = "keyframe.bin"
DELTA_FILE: Final = "global_delta.bin"
PLAN_FILE: Final = "plan.bin"
ONNX_MODEL_FILE: Final = "model.onnx.bin"
FEEDBACK_FILE: Final = "feedback.bin"
PERSONAL_FILE: Final = "personal.bin"
SPEC_FILE_PREFIX: Final = "spec-"
SPEC_FILE_SUFFIX: Final = ".bin"
OUTBOX_DIR: Final = "outbox"
LOCK_FILE: Final = ".lock"


@dataclass
class AgentState:
    """What must survive a restart so that the device neither repeats nor reuses anything.

    ``next_seq``: the seq of the next update (monotonic per device, never reused).
    ``last_trained_version``: the global version the last update was trained from (-1: none);
    with ``updates_for_version`` it enforces "at most N updates per global version".
    ``last_round_at``: wall-clock start of the last round, for the minimum interval.
    ``feedback_spec``: fingerprint of the model the error-feedback residual belongs to (kept
    in ``feedback.bin`` or, for int4, in memory only).
    ``last_evaluated_version``: the last global version evaluated (-1: none), reported once.
    """

    next_seq: int = 0
    last_trained_version: int = -1
    updates_for_version: int = 0
    last_round_at: float = 0.0
    feedback_spec: str = ""
    last_evaluated_version: int = -1

    def reconcile(self, max_outbox_seq: int | None, max_outbox_version: int | None) -> bool:
        """Catch up with updates that reached the outbox but not agent.json (crash between).

        The outbox file is written before agent.json; if the agent died in between, the
        outbox proves that seq and that version were used. Returns whether anything changed.
        """
        changed = False
        if max_outbox_seq is not None and max_outbox_seq >= self.next_seq:
            self.next_seq = max_outbox_seq + 1
            changed = True
        if max_outbox_version is not None and max_outbox_version > self.last_trained_version:
            self.last_trained_version = max_outbox_version
            self.updates_for_version = 1
            changed = True
        return changed


class StateStore:
    """Loads and saves :class:`AgentState` as JSON in ``agent.json``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / STATE_FILE

    def load(self) -> AgentState:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return AgentState()
        except (OSError, ValueError) as e:
            # Atomic writes make this unexpected; starting over is safe because the outbox
            # reconciliation restores the seq counter from any update not yet delivered.
            log.error("cannot read %s (%s); starting from a fresh state", self.path, e)
            return AgentState()
        state = AgentState()
        if isinstance(raw, dict):
            for f in fields(AgentState):
                value = raw.get(f.name)
                default = getattr(state, f.name)
                if isinstance(value, type(default)) and not isinstance(value, bool):
                    setattr(state, f.name, value)
                elif isinstance(default, float) and isinstance(value, int):
                    setattr(state, f.name, float(value))
        return state

    def save(self, state: AgentState) -> int:
        """Write ``state`` atomically; returns the bytes written."""
        data = json.dumps(asdict(state), indent=1, sort_keys=True).encode()
        atomic_write_bytes(self.path, data, mode=0o600)
        return len(data)


def spec_file(fingerprint: str) -> str:
    """The file name of the spec with this (verified, hexadecimal) fingerprint."""
    return f"{SPEC_FILE_PREFIX}{fingerprint}{SPEC_FILE_SUFFIX}"


def spec_files(state_dir: Path) -> list[Path]:
    """The stored spec files, oldest first (by modification time)."""
    try:
        found = [
            p
            for p in Path(state_dir).iterdir()
            if p.name.startswith(SPEC_FILE_PREFIX) and p.name.endswith(SPEC_FILE_SUFFIX)
        ]
    except FileNotFoundError:
        return []
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def stored_specs(
    state_dir: Path, verifier: Verifier, federation: str | None = None
) -> dict[str, ModelSpec]:
    """The specs stored in ``state_dir`` that verify (and belong to ``federation`` if given),
    by fingerprint; a file that does not verify is left out (a model naming it is then
    refused as ``unknown_spec``)."""
    specs: dict[str, ModelSpec] = {}
    for path in spec_files(state_dir):
        try:
            msg = wire.decode(path.read_bytes(), wire.SpecMessage, verifier)
        except (OSError, DecodeError):
            continue
        if federation is None or msg.federation == federation:
            specs[msg.fingerprint] = msg.spec
    return specs


class StateDirLockedError(FedMQTTError):
    """Another agent process already uses this state directory."""


class StateDirLock(DirLock):
    """An exclusive, non-blocking flock on ``<state_dir>/.lock``; released by the kernel on exit.

    flock dies with the process (even on SIGKILL), so a stale lock never blocks a restart.
    """

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, LOCK_FILE)

    def acquire(self) -> None:
        if not self.try_acquire():
            raise StateDirLockedError(
                f"state directory {self.path.parent} is in use by another edge-agent"
            )
