"""What a simulation shows while it runs and leaves behind: progress line, JSON summary, plot."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from fedmqtt.fsutil import atomic_write_bytes


@dataclass
class Point:
    t: float  # seconds since start
    version: int
    accuracy: float | None
    uploads: int  # updates received by the aggregator so far
    bytes_uploaded: int  # update payloads received by the aggregator
    online: int
    bytes_downloaded: int = 0  # payloads received by the devices' MQTT clients, all kinds
    federated: float | None = None  # the newest federated evaluation's metric (devices' data)
    # With the evaluation gate: the holdout accuracy of the version it last released (the
    # model the predictors get), and the rollbacks so far.
    released_accuracy: float | None = None
    rollbacks: int = 0
    epsilon: float | None = None  # differential privacy: ε of the worst-case device
    eval_version: int | None = None  # the version ``accuracy`` is of

    @property
    def bytes_total(self) -> int:
        return self.bytes_uploaded + self.bytes_downloaded


@dataclass
class Progress:
    """Keeps the history and prints one status line (rewritten in place on a terminal)."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    every_s: float = 5.0
    history: list[Point] = field(default_factory=list)
    _last_print: float = 0.0
    _last_uploads: int = 0
    _last_t: float = 0.0

    def record(self, p: Point) -> None:
        self.history.append(p)
        tty = self.out.isatty()
        now = time.monotonic()
        if not tty and now - self._last_print < self.every_s:
            return
        dt = max(p.t - self._last_t, 1e-9)
        rate = (p.uploads - self._last_uploads) / dt
        self._last_uploads, self._last_t, self._last_print = p.uploads, p.t, now
        acc = "  -  " if p.accuracy is None else f"{p.accuracy:.3f}"
        fed = "" if p.federated is None else f" (devices {p.federated:.3f})"
        line = (
            f"t={p.t:6.1f}s  version {p.version:5d}  accuracy {acc}{fed}  "
            f"{rate:7.1f} updates/s  up {_mb(p.bytes_uploaded)}  down {_mb(p.bytes_downloaded)}  "
            f"devices online {p.online}"
        )
        if p.epsilon is not None:
            line += f"  ε {p.epsilon:.2f}"
        if tty:
            self.out.write("\r" + line + " " * 4)
        else:
            self.out.write(line + "\n")
        self.out.flush()

    def close(self) -> None:
        if self.out.isatty():
            self.out.write("\n")
            self.out.flush()

    def first_reaching(self, target: float) -> Point | None:
        """The first point at which a version evaluated at ``target`` or above existed: the
        version of the first evaluation reaching it, at the first point showing that version
        published. What happened between its publication and its evaluation (the devices'
        next downloads and uploads) is not counted, as a synchronous round's traffic after the
        model it produces is not."""
        for i, p in enumerate(self.history):
            if p.accuracy is not None and p.accuracy >= target:
                if p.eval_version is None:
                    return p
                v = p.eval_version
                return next((q for q in self.history[: i + 1] if q.version >= v), p)
        return None


def _mb(n: int) -> str:
    return f"{n / 1e6:7.2f} MB"


def write_json(path: Path, summary: dict[str, Any]) -> None:
    atomic_write_bytes(path, (json.dumps(summary, indent=2) + "\n").encode(), mode=0o644)


def history_as_dicts(history: list[Point]) -> list[dict[str, Any]]:
    return [asdict(p) for p in history]


def plot(path: Path, history: list[Point], *, title: str, centralized: float | None) -> None:
    """Accuracy against wall time, and against the bytes carried (uploaded, downloaded and
    both together), side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [p for p in history if p.accuracy is not None]
    acc = [p.accuracy for p in pts]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    a1.plot([p.t for p in pts], acc, marker=".", label="global model, server holdout")
    fed = [p for p in history if p.federated is not None]
    if fed:
        a1.plot([p.t for p in fed], [p.federated for p in fed], ".", color="C5", label="devices")
    released = [p for p in history if p.released_accuracy is not None]
    if released:
        a1.plot(
            [p.t for p in released],
            [p.released_accuracy for p in released],
            color="C4",
            label="released (evaluation gate)",
        )
        prev = 0
        for p in history:
            if p.rollbacks > prev:
                a1.axvline(p.t, color="red", lw=0.8, alpha=0.5)
            prev = p.rollbacks
        a1.plot([], [], color="red", lw=0.8, label="rollback")
    for label, color, mb in (
        ("uploaded", "C1", [p.bytes_uploaded / 1e6 for p in pts]),
        ("downloaded", "C2", [p.bytes_downloaded / 1e6 for p in pts]),
        ("both", "C3", [p.bytes_total / 1e6 for p in pts]),
    ):
        a2.plot(mb, acc, marker=".", color=color, label=label)
    for ax, xlabel in ((a1, "wall time (s)"), (a2, "MB carried (payloads)")):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if centralized is not None:
            ax.axhline(centralized, color="grey", ls="--", lw=1, label="centralized")
    a1.set_ylabel("test accuracy")
    a1.legend(loc="lower right")
    eps = [p for p in history if p.epsilon is not None]
    if eps:  # differential privacy: ε of the worst-case device on a second axis
        a3 = a1.twinx()
        a3.plot([p.t for p in eps], [p.epsilon for p in eps], color="C6", ls=":", label="ε")
        a3.set_ylabel("ε (worst-case device)", color="C6")
    a2.legend(loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
