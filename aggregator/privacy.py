"""Central differential privacy in the aggregator: noised releases, per-device release counts,
the ε of the worst-case device and the enforced budget (``[privacy]``, docs/privacy.md).

The strategy hands every buffer (FedBuff, FedAvg) or every applied update (FedAsync) to
:meth:`PrivacyState.release` instead of its plain mean: the rows are clipped to ``clip``,
summed with their staleness weights, noised with standard deviation ``sigma * m * clip``
(``m`` = ``[strategy] max_per_device``) and divided by the configured buffer size
(:mod:`fedmqtt.privacy.mechanism` states the sensitivity argument). Each device whose rows
were in a release gets one more release on its count; ε of a device is the RDP accountant's ε
for that many Gaussian releases (:mod:`fedmqtt.privacy.accountant`). The counts are part of the
strategy's checkpoint state, written before anything they cover is published, so a restart or
a ``kill -9`` never resets ε.

Budget: with ``max_epsilon`` set, a device that has contributed to as many releases as the
budget allows is refused (reason ``privacy_budget``) before its update is decoded, so the model
does not change; with ``on_budget = "stop"`` every update is refused once any device has spent
its budget.
"""

from __future__ import annotations

import logging
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from aggregator.checkpoint import CheckpointError
from aggregator.config import StrategyConfig
from fedmqtt.errors import PRIVACY_BUDGET, RejectedError
from fedmqtt.params import F32
from fedmqtt.privacy.accountant import ACCOUNTANT, gaussian_epsilon, releases_within
from fedmqtt.privacy.config import PrivacyConfig
from fedmqtt.privacy.mechanism import gaussian_release

log = logging.getLogger(__name__)


class PrivacyState:
    def __init__(
        self,
        cfg: PrivacyConfig,
        strategy: StrategyConfig,
        rng: np.random.Generator | None = None,
    ) -> None:
        if cfg.mode != "central":
            raise ValueError("PrivacyState is the aggregator's central DP")
        self.cfg = cfg
        self.sigma = cfg.noise_multiplier
        # FedAsync releases one update at a time; a buffer holds up to max_per_device rows of
        # one device (config validation refuses 0 = unbounded with DP).
        self.rows_per_device = 1 if strategy.name == "fedasync" else strategy.max_per_device
        self.denominator = float(
            {"fedbuff": strategy.buffer_size, "fedavg": strategy.min_updates}.get(strategy.name, 1)
        )
        # Noise from OS entropy (not reproducible by design; docs/privacy.md on its limits).
        self.rng = rng if rng is not None else np.random.default_rng(secrets.randbits(128))
        self.counts: Counter[str] = Counter()
        self.releases = 0
        self.stopped = False
        self.max_releases = cfg.max_releases
        self.refused = 0
        self._warned: set[str] = set()
        # Load the accountant (dp-accounting, scipy: about a second) now, at start, not on the
        # engine thread at the first release.
        gaussian_epsilon(self.sigma, 1, cfg.delta)

    # ------------------------------------------------------------------ budget
    def admit(self, sender: str) -> None:
        """RejectedError (``privacy_budget``) if an update of ``sender`` may not be used."""
        limit = self.max_releases
        if limit is None:
            return
        if self.stopped:
            self.refused += 1
            raise RejectedError(
                PRIVACY_BUDGET,
                f"training stopped: a device spent its privacy budget (max_epsilon "
                f"{self.cfg.max_epsilon}, on_budget = stop)",
            )
        if self.counts[sender] >= limit:
            self.refused += 1
            if sender not in self._warned:
                self._warned.add(sender)
                log.warning(
                    "device %r has spent its privacy budget: epsilon %.3f after %d releases "
                    "(max_epsilon %s); its updates are refused from now on",
                    sender,
                    self.device_epsilon(sender),
                    self.counts[sender],
                    self.cfg.max_epsilon,
                )
            raise RejectedError(
                PRIVACY_BUDGET,
                f"device {sender!r} has spent its privacy budget ({self.counts[sender]} "
                f"releases, max_epsilon {self.cfg.max_epsilon})",
            )

    # ------------------------------------------------------------------ releases
    def release(self, rows: F32, weights: Any, senders: Sequence[str]) -> F32:
        """The noised, clipped aggregate of ``rows`` (one per sender, weights in [0, 1]);
        counts the release for every distinct sender."""
        out, _ = gaussian_release(
            rows,
            weights,
            clip=self.cfg.clip,
            sigma=self.sigma,
            rows_per_device=self.rows_per_device,
            denominator=self.denominator,
            rng=self.rng,
        )
        self.releases += 1
        for s in set(senders):
            self.counts[s] += 1
        limit = self.max_releases
        if (
            limit is not None
            and self.cfg.on_budget == "stop"
            and not self.stopped
            and self.worst_count() >= limit
        ):
            self.stopped = True
            log.warning(
                "privacy budget spent: a device reached epsilon %.3f (max_epsilon %s); "
                "training stops, every further update is refused",
                self.epsilon(),
                self.cfg.max_epsilon,
            )
        return out

    # ------------------------------------------------------------------ views
    def worst_count(self) -> int:
        return max(self.counts.values(), default=0)

    def device_epsilon(self, sender: str) -> float:
        return gaussian_epsilon(self.sigma, self.counts[sender], self.cfg.delta)

    def epsilon(self) -> float:
        """ε at δ of the worst-case device (most releases); 0 before any release."""
        return gaussian_epsilon(self.sigma, self.worst_count(), self.cfg.delta)

    @property
    def exhausted(self) -> int:
        """Devices whose budget is spent."""
        limit = self.max_releases
        if limit is None:
            return 0
        return sum(1 for n in self.counts.values() if n >= limit)

    def status(self) -> dict[str, Any]:
        """For status.json, the metrics topic and Prometheus."""
        return {
            "mode": "central",
            "accountant": ACCOUNTANT,
            "noise_multiplier": self.sigma,
            "clip": self.cfg.clip,
            "delta": self.cfg.delta,
            "epsilon": self.epsilon(),
            "max_epsilon": self.cfg.max_epsilon or None,
            "releases": self.releases,
            "worst_device_releases": self.worst_count(),
            "max_releases_per_device": self.max_releases,
            "devices_exhausted": self.exhausted,
            "stopped": self.stopped,
            "refused": self.refused,
            "sampling_amplification": False,
        }

    # ------------------------------------------------------------------ state
    def to_state(self) -> dict[str, Any]:
        return {
            "noise_multiplier": self.sigma,
            "clip": self.cfg.clip,
            "delta": self.cfg.delta,
            "rows_per_device": self.rows_per_device,
            "target_epsilon": self.cfg.target_epsilon,
            "planned_releases": self.cfg.planned_releases,
            "counts": dict(self.counts),
            "releases": self.releases,
            "stopped": self.stopped,
        }

    def load_state(self, state: Mapping[str, Any] | None) -> None:
        """Continue the counts of a checkpoint. ε of past releases depends on the σ, C and
        rows per device they were made with: a checkpoint made with other values, or without
        DP after releases with it, is refused rather than mis-accounted."""
        if state is None:
            # A checkpoint without DP state: its versions were made without central DP and
            # cost no privacy (they are not differentially private either; docs/privacy.md).
            return
        counts = state.get("counts", {})
        if not isinstance(counts, Mapping) or not all(
            isinstance(k, str) and isinstance(v, int) and v >= 0 for k, v in counts.items()
        ):
            raise CheckpointError("privacy counts must map device ids to release counts")
        same_target = self.cfg.target_epsilon is not None and (
            state.get("target_epsilon"),
            state.get("planned_releases"),
        ) == (self.cfg.target_epsilon, self.cfg.planned_releases)
        if counts and same_target:
            # The same target: keep the σ the releases were made with (another version of the
            # library could calibrate a slightly different one).
            self.sigma = float(state.get("noise_multiplier", self.sigma))
            if self.cfg.max_epsilon > 0:
                self.max_releases = releases_within(
                    self.sigma, self.cfg.delta, self.cfg.max_epsilon
                )
        if counts and (
            float(state.get("noise_multiplier", -1)) != self.sigma
            or float(state.get("clip", -1)) != self.cfg.clip
            or int(state.get("rows_per_device", -1)) != self.rows_per_device
        ):
            raise CheckpointError(
                "the checkpointed privacy releases were made with noise_multiplier "
                f"{state.get('noise_multiplier')}, clip {state.get('clip')}, "
                f"{state.get('rows_per_device')} row(s) per device; the config says "
                f"{self.sigma}, {self.cfg.clip}, {self.rows_per_device}. The accountant "
                "cannot continue across a change: restore the old [privacy] / [strategy] or "
                "start a new state directory"
            )
        self.counts = Counter({str(k): int(v) for k, v in counts.items()})
        self.releases = int(state.get("releases", 0))
        self.stopped = bool(state.get("stopped", False))
