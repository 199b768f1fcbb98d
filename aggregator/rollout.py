"""Rollout and rollback: the version history, the evaluation gate, and rollbacks.

**Rollback** (``fl-aggregator rollback --to-version V``, or the gate): the parameters of
version ``V`` (from its checkpoint, so ``V`` must be among the ``[checkpoint] keep`` newest)
become a *new, higher* version: devices never move backwards, the replay window and every
counter carry on, and the new version's ``stats`` say ``rollback_to = V``. Against a running
service the command writes a request file into the state directory (mode 0700, owned by the
service's user: whoever may write there may already replace the model) and waits for the
service's answer; the service picks the request up within 0.1 s, makes the version on its
engine thread, checkpoints and publishes it like any other. While the service is stopped the
command does the same on the state directory itself, under the lock the service holds while it
runs (:class:`StateLock`), so the two never write at once.

**Evaluation gate** (``[rollout] gate = true``): a published version reaches the devices'
predictors (the ONNX export) only when its evaluation is not worse than the best of the last
``last_k`` released versions by more than ``margin``; otherwise the aggregator rolls back to
that best version automatically (counted in ``rollbacks``, logged at WARNING). The gate asks an
:data:`Evaluation` for a version's score: the server holdout (``[evaluation] holdout``) where
configured, else the federated evaluation the service offers
(:meth:`aggregator.service.Aggregator.federated_evaluation`); with neither, the gate says so in
the log at start and versions are released unjudged.

**History** (``state_dir/history.json``, ``fl-aggregator history``): every published version
with its origin, evaluation and the gate's verdict, newest last, at most
:data:`HISTORY_MAX` entries; rewritten atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from fedmqtt.errors import FedMQTTError
from fedmqtt.fsutil import DirLock, atomic_write_bytes
from fedmqtt.params import F32
from fedmqtt.tomltable import Table

log = logging.getLogger(__name__)

HISTORY_FILE: Final = "history.json"
HISTORY_MAX: Final = 500
REQUEST_FILE: Final = "rollback.request"
RESULT_FILE: Final = "rollback.result"
LOCK_FILE: Final = ".lock"
ROLLBACK_STAT: Final = "rollback_to"  # the stats key of a version made by a rollback

Evaluation = Callable[[int], "float | None"]
"""The gate's evaluation of a published version: its score, higher is better (accuracy, R²),
or None while it is not known (not evaluated yet, too few device reports)."""


@dataclass(frozen=True)
class RolloutConfig:
    """``[rollout]``: the evaluation gate."""

    gate: bool = False
    margin: float = 0.02
    last_k: int = 3
    min_reports: int = 3  # devices whose federated evaluation of a version the gate waits for


def read_rollout(t: Table) -> RolloutConfig:
    d = RolloutConfig()
    return RolloutConfig(
        gate=t.flag("gate", d.gate),
        margin=t.number("margin", d.margin, lo=0.0),
        last_k=t.integer("last_k", d.last_k, lo=1, hi=100),
        min_reports=t.integer("min_reports", d.min_reports, lo=1, hi=1_000_000),
    )


class RollbackError(FedMQTTError):
    """A rollback cannot be done (unknown version, service did not answer, ...)."""


# ------------------------------------------------------------------------------ state lock


class StateLock(DirLock):
    """An exclusive, non-blocking flock on ``<state_dir>/.lock``: held by the running service
    and by an offline rollback (released by the kernel when the process dies)."""

    def __init__(self, state_dir: Path) -> None:
        super().__init__(state_dir, LOCK_FILE)

    def acquire(self) -> None:
        if not self.try_acquire():
            raise FedMQTTError(
                f"{self.path.parent} is in use by another aggregator process (or an offline "
                "fl-aggregator rollback): one service per state directory"
            )


# ------------------------------------------------------------------------------ history


class History:
    """The published versions with their evaluation and verdict (thread-safe)."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / HISTORY_FILE
        self._lock = threading.Lock()
        self._entries: deque[dict[str, Any]] = deque(read_history(state_dir), maxlen=HISTORY_MAX)
        self.dirty = False

    def entries(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(e) for e in self._entries]

    def _entry(self, version: int) -> dict[str, Any] | None:
        found = [e for e in self._entries if e.get("version") == version]
        return found[-1] if found else None

    def published(self, version: int, created_at: float, stats: dict[str, float]) -> None:
        with self._lock:
            if self._entry(version) is not None:
                return
            to = stats.get(ROLLBACK_STAT)
            self._entries.append(
                {
                    "version": version,
                    "created_at": round(created_at, 3),
                    "published_at": round(time.time(), 3),
                    "origin": "rollback" if to is not None else "aggregation",
                    "rollback_to": None if to is None else int(to),
                    "score": None,
                    "metric": None,
                    "verdict": None,
                }
            )
            self.dirty = True

    def update(self, version: int, **fields: Any) -> None:
        with self._lock:
            e = self._entry(version)
            if e is not None:
                e.update(fields)
                self.dirty = True

    def save(self) -> None:
        """Rewrite ``history.json`` atomically if anything changed."""
        with self._lock:
            if not self.dirty:
                return
            data = json.dumps(list(self._entries), indent=1).encode()
            self.dirty = False
        atomic_write_bytes(self.path, data, mode=0o600)


def read_history(state_dir: Path) -> list[dict[str, Any]]:
    path = Path(state_dir) / HISTORY_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as e:
        log.warning("%s unreadable (%s): the history starts afresh", path, e)
        return []
    if not isinstance(raw, list):
        return []
    return [cast(dict[str, Any], e) for e in raw if isinstance(e, dict)][-HISTORY_MAX:]


def format_history(entries: list[dict[str, Any]], kept: set[int], limit: int) -> str:
    """The newest ``limit`` entries as a table; ``kept``: versions a rollback can go to."""
    lines = [f"{'version':>8}  {'published (UTC)':<19}  {'origin':<14}  {'score':>8}  verdict"]
    for e in entries[-limit:][::-1]:
        v = int(e.get("version", -1))
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(float(e.get("published_at", 0))))
        origin = str(e.get("origin", "?"))
        if e.get("rollback_to") is not None:
            origin = f"rollback to {e['rollback_to']}"
        score = e.get("score")
        text = "-" if score is None else f"{float(score):.4f}"
        verdict = str(e.get("verdict") or "-")
        mark = "  (checkpoint kept)" if v in kept else ""
        lines.append(f"{v:>8}  {when:<19}  {origin:<14}  {text:>8}  {verdict}{mark}")
    if len(lines) == 1:
        lines.append("(no version published yet)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ scores


class ScoreBook:
    """Scores by version, filled by the holdout evaluation; :meth:`get` is an
    :data:`Evaluation`."""

    def __init__(self, size: int = 64) -> None:
        self._scores: dict[int, float] = {}
        self._size = size
        self._lock = threading.Lock()

    def put(self, version: int, score: float) -> None:
        with self._lock:
            self._scores[version] = score
            while len(self._scores) > self._size:
                del self._scores[min(self._scores)]

    def get(self, version: int) -> float | None:
        with self._lock:
            return self._scores.get(version)


# ------------------------------------------------------------------------------ the gate


@dataclass(frozen=True)
class Release:
    """Version ``version`` may reach the predictors."""

    version: int
    params: F32
    created_at: float


@dataclass(frozen=True)
class Rollback:
    """Roll back to ``to_version`` (``params``): ``failed`` scored ``score``, below the best
    recent score ``best`` by more than the margin."""

    to_version: int
    params: F32
    failed: int
    score: float
    best: float


Verdict = tuple[int, str, "float | None"]  # version, verdict, score


@dataclass
class _Good:
    version: int
    score: float
    params: F32


class Gate:
    """Judges published versions by their evaluation (see the module's docstring).

    Runs on the service's event loop: :meth:`published` for each published version,
    :meth:`poll` regularly; it keeps the parameters of the last ``last_k`` released versions
    (references to the snapshots' arrays, which are never modified in place).
    """

    def __init__(self, cfg: RolloutConfig, evaluation: Evaluation | None, source: str) -> None:
        self.cfg = cfg
        self.evaluation = evaluation
        self.source = source
        self.released_version = -1
        self.released_score: float | None = None
        self._pending: dict[int, tuple[F32, float, bool]] = {}  # version -> params, time, manual
        self._good: deque[_Good] = deque(maxlen=cfg.last_k)
        self._holding_until: int | None = None  # a rollback is under way until this version

    def published(
        self, version: int, params: F32, created_at: float, stats: dict[str, float]
    ) -> None:
        """A version was published (``stats`` say whether an operator's rollback made it)."""
        manual = stats.get(ROLLBACK_STAT) is not None and stats.get("rollback_manual") == 1.0
        self._pending[version] = (params, created_at, manual)

    def rolling_back(self, until: int | None) -> None:
        """The gate's rollback made version ``until``: versions before it fail without another
        rollback (None: the rollback failed, the next failing version asks again)."""
        self._holding_until = until

    def poll(self) -> tuple[list[Verdict], Release | Rollback | None]:
        """Judge the newest pending version that has a score; returns the verdicts given
        (version, verdict, score) and what to do."""
        if not self._pending:
            return [], None
        newest = max(self._pending)
        if self.evaluation is None:
            params, created, _ = self._pending[newest]
            verdicts: list[Verdict] = [(v, "ungated", None) for v in sorted(self._pending)]
            self._pending.clear()
            self.released_version = newest
            return verdicts, Release(newest, params, created)
        for v in sorted(self._pending, reverse=True):
            score = self.evaluation(v)
            if score is None:
                continue
            params, created, manual = self._pending[v]
            verdicts = [(old, "superseded", None) for old in sorted(self._pending) if old < v]
            for old in [old for old in self._pending if old <= v]:
                del self._pending[old]
            verdict, action = self._judge(v, score, params, created, manual)
            verdicts.append((v, verdict, score))
            return verdicts, action
        return [], None

    def _judge(
        self, v: int, score: float, params: F32, created: float, manual: bool
    ) -> tuple[str, Release | Rollback | None]:
        if manual:  # an operator's rollback is the new baseline
            self._good.clear()
            self._holding_until = None
            return self._release(v, score, params, created, "released (operator's rollback)")
        if self._holding_until is not None and v >= self._holding_until:
            self._holding_until = None
        best = max(self._good, key=lambda g: g.score) if self._good else None
        if best is None or score >= best.score - self.cfg.margin:
            return self._release(v, score, params, created, "released")
        if self._holding_until is not None:
            return "held (rollback under way)", None
        self._holding_until = 1 << 62  # until the rollback's version is known
        return "held: rolled back", Rollback(best.version, best.params, v, score, best.score)

    def _release(
        self, v: int, score: float, params: F32, created: float, verdict: str
    ) -> tuple[str, Release]:
        self._good.append(_Good(v, score, params))
        self.released_version, self.released_score = v, score
        return verdict, Release(v, params, created)


def choose_evaluation(
    holdout: ScoreBook | None, federated: Evaluation | None
) -> tuple[Evaluation | None, str]:
    """The gate's evaluation: the server holdout where configured, else the federated one."""
    if holdout is not None:
        return holdout.get, "holdout"
    if federated is not None:
        return federated, "federated"
    return None, "none"


# ------------------------------------------------------------------------------ requests


def write_request(state_dir: Path, to_version: int) -> str:
    """Ask the running service for a rollback; returns the request's id."""
    rid = uuid.uuid4().hex
    body = {"id": rid, "to_version": to_version, "at": time.time()}
    atomic_write_bytes(Path(state_dir) / REQUEST_FILE, json.dumps(body).encode(), mode=0o600)
    return rid


def take_request(state_dir: Path) -> dict[str, Any] | None:
    """The pending request, removed from the directory (None if there is none)."""
    path = Path(state_dir) / REQUEST_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raw = {"error": f"unreadable request: {e}"}
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    if not isinstance(raw, dict):
        return {"error": "the request is not a JSON object"}
    return cast(dict[str, Any], raw)


def write_result(state_dir: Path, result: dict[str, Any]) -> None:
    atomic_write_bytes(Path(state_dir) / RESULT_FILE, json.dumps(result).encode(), mode=0o600)


def wait_result(state_dir: Path, rid: str, timeout: float) -> dict[str, Any]:
    """The service's answer to request ``rid``; RollbackError if none comes in ``timeout``."""
    path = Path(state_dir) / RESULT_FILE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(FileNotFoundError, ValueError, OSError):
            raw = json.loads(path.read_text())
            if isinstance(raw, dict) and raw.get("id") == rid:
                return cast(dict[str, Any], raw)
        time.sleep(0.05)
    with contextlib.suppress(FileNotFoundError):
        (Path(state_dir) / REQUEST_FILE).unlink()
    raise RollbackError(
        f"the running service did not answer within {timeout:g} s (request withdrawn); "
        "is it stuck? see its log"
    )
