"""The simulator's ``federated_eval`` series: per version, the devices' federated evaluation
next to the server-holdout score of the same version.

The aggregator scores versions on the holdout as it publishes them (not necessarily every
version); :class:`HoldoutLog` notes each score it sees in the snapshots, and
:func:`federated_series` joins them with the aggregator's per-version federated summaries
(:meth:`aggregator.fedeval.FederatedEval.history`) at the end of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class HoldoutLog:
    """The server-holdout score of each version, as seen in the aggregator's snapshots."""

    by_version: dict[int, float] = field(default_factory=dict)

    def note(self, snap: dict[str, Any]) -> None:
        version, score = snap.get("eval_version"), snap.get("accuracy")
        if version is not None and score is not None:
            self.by_version[int(version)] = float(score)


def federated_series(summaries: list[dict[str, Any]], holdout: HoldoutLog) -> list[dict[str, Any]]:
    """One entry per version with a federated evaluation, oldest first, with the holdout score
    of that version (``holdout_accuracy``, None if the aggregator did not score it)."""
    return [{**s, "holdout_accuracy": holdout.by_version.get(int(s["version"]))} for s in summaries]


def federated_metric(snap: dict[str, Any]) -> float | None:
    """The headline metric of the newest federated evaluation in a snapshot, if any."""
    fed = snap.get("federated_eval")
    return float(fed["metric"]) if isinstance(fed, dict) else None
