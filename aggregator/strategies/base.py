"""What every strategy shares: a buffer of accepted deltas and its (de)serialisation.

A strategy owns a preallocated ``(capacity, d)`` float32 array. The engine decodes the next
candidate update straight into :meth:`Strategy.slot` (the first free row), so an accepted delta
is never copied; a candidate that fails validation is simply not committed and its row is
reused. An int8 tensor may stay unscaled in its row, with its scale beside it in
:meth:`Strategy.slot_scales` (one per tensor of the model): the plain weighted mean folds the
scales into its coefficients, and every other use of the rows applies them first. When
:meth:`Strategy.ready` says so, :meth:`Strategy.aggregate` turns the buffer into new parameters
with the pure functions of :mod:`fedmqtt.aggregation` and empties it.

One device's weight is bounded: :meth:`Strategy.admit` refuses (``device_quota``) an update
whose sender already holds ``[strategy] max_per_device`` rows of the buffer, before it is
decoded; FedAsync, whose buffer is one update, bounds a window of versions instead. The
engine asks before decoding, so a refused update costs no decoding and changes nothing.

The buffer is NOT part of the checkpoint: a buffered update is acknowledged to the broker only
once the version that applies it is durable, so after a crash the broker redelivers it.
:meth:`Strategy.to_state` holds what outlives a version: the strategy's name, the server
optimizer's state (momentum, or an adaptive optimizer's moments) and, with central
differential privacy, the per-device release counts (:mod:`aggregator.privacy`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from aggregator.checkpoint import CheckpointError, f32, tensor
from aggregator.config import StrategyConfig
from aggregator.validate import UpdateMeta
from fedmqtt.aggregation import (
    Reducer,
    ServerOptimizer,
    clip_by_norm,
    fedbuff_aggregate,
    mean_of_rows,
)
from fedmqtt.aggregation.serveropt import ADAPTIVE, AdaptiveOptimizer, adaptive_optimizer
from fedmqtt.aggregation.staleness import Staleness
from fedmqtt.errors import DEVICE_QUOTA, RejectedError
from fedmqtt.params import F32

# The server step: the plain one (lr, momentum) or an adaptive optimizer (serveropt).
ServerStep = ServerOptimizer | AdaptiveOptimizer
if TYPE_CHECKING:
    from aggregator.privacy import PrivacyState


@dataclass(frozen=True, slots=True)
class Pending:
    """An accepted update waiting in the buffer (its delta is the row of the same index)."""

    meta: UpdateMeta
    tau: int  # staleness when it arrived
    weight: float  # s(tau)
    norm: float


class Strategy(ABC):
    name: ClassVar[str]
    # Whether an update over ``max_per_device`` may wait for the next buffer (aggregator.engine)
    # rather than be refused: a buffer that empties whole at each version.
    defers: ClassVar[bool] = True

    def __init__(
        self,
        cfg: StrategyConfig,
        d: int,
        capacity: int,
        segments: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        self.cfg = cfg
        self.d = d
        self.capacity = capacity
        self.staleness: Staleness = cfg.staleness_fn()
        self.rows: F32 = np.zeros((capacity, d), dtype=np.float32)
        # With segments ((start, stop) of each tensor in a row), each buffered row keeps a
        # scale per tensor: its values are the row times them. None: rows hold the values.
        self.segments = tuple(segments or ())
        self.scales: F32 | None = (
            np.ones((capacity, len(self.segments)), dtype=np.float32) if segments else None
        )
        self.pending: list[Pending] = []
        self.pending_ids: set[str] = set()
        self.per_device: Counter[str] = Counter()  # buffered rows of each sender
        self.version_started = 0.0
        # Central DP (aggregator.privacy): set by the engine when [privacy] mode = "central".
        self.privacy: PrivacyState | None = None
        self._privacy_saved: Any = None  # a checkpoint's DP state, kept while DP is off

    # ------------------------------------------------------------------ buffer
    def __len__(self) -> int:
        return len(self.pending)

    @property
    def max_staleness(self) -> int:
        return self.cfg.max_staleness

    def slot(self) -> F32:
        """The row the next candidate delta is decoded into."""
        row: F32 = self.rows[len(self.pending)]
        return row

    def slot_scales(self) -> F32 | None:
        """The scales of :meth:`slot`'s tensors, one per segment (None if this strategy keeps
        none): the row's values are the row times these. The decoder writes every entry
        (``decode_delta(..., scales=)``); a row filled any other way must set them to 1."""
        return None if self.scales is None else self.scales[len(self.pending)]

    def admit(self, sender: str) -> None:
        """RejectedError (``device_quota``) if an update of ``sender`` may not enter the
        buffer now: the sender already holds ``max_per_device`` of its rows."""
        if self.privacy is not None:
            self.privacy.admit(sender)
        limit = self.cfg.max_per_device
        if limit and self.per_device[sender] >= limit:
            raise RejectedError(
                DEVICE_QUOTA,
                f"device {sender!r} already holds {limit} row(s) of this buffer "
                "([strategy] max_per_device)",
            )

    def add(self, meta: UpdateMeta, tau: int, norm: float) -> None:
        """Commit the delta just decoded into :meth:`slot` (its sender passed :meth:`admit`)."""
        if len(self.pending) >= self.capacity:
            raise RuntimeError("strategy buffer is full; aggregate first")
        self.pending.append(Pending(meta, tau, float(self.staleness(tau)), norm))
        self.pending_ids.add(meta.update_id)
        self.per_device[meta.sender] += 1

    def clipped(self, bound: float | None) -> F32:
        """The buffered rows' values (scales applied), clipped to ``bound`` if clipping is
        configured and known."""
        self._apply_scales()
        x = self.rows[: len(self.pending)]
        if self.cfg.clip and bound is not None:
            x, _ = clip_by_norm(x, bound * self.cfg.clip_factor)
        return x

    def _apply_scales(self) -> None:
        """Multiply the buffered rows by their scales, in place (then all scales are 1)."""
        if self.scales is None:
            return
        k = len(self.pending)
        scales = self.scales[:k]
        if bool(np.all(scales == 1.0)):
            return
        for t, (a, b) in enumerate(self.segments):
            self.rows[:k, a:b] *= scales[:, t : t + 1]
        scales.fill(1.0)

    def buffered_delta(self, bound: float | None, s: F32) -> F32:
        """:meth:`reduce` of the buffer with staleness weights ``s``. The plain mean without
        clipping takes the rows as they are, folding their scales into its coefficients. With
        central DP it is the noised, clipped release of :mod:`aggregator.privacy`."""
        if self.privacy is not None:
            return self.private_delta(s)
        if self.cfg.reducer == "mean" and not (self.cfg.clip and bound is not None):
            k = len(self.pending)
            n = np.array([p.meta.num_samples for p in self.pending], dtype=np.float32)
            scales = None if self.scales is None else self.scales[:k]
            return mean_of_rows(self.rows[:k], s, n, scales, self.segments)
        return self.reduce(self.clipped(bound), s)

    def private_delta(self, s: F32) -> F32:
        """The central-DP release of the buffered rows with weights ``s`` (counts it)."""
        assert self.privacy is not None
        self._apply_scales()
        rows = self.rows[: len(self.pending)]
        return self.privacy.release(rows, s, [p.meta.sender for p in self.pending])

    def reduce(self, x: F32, s: F32) -> F32:
        """The aggregate delta of rows ``x`` with staleness weights ``s`` (and sample counts).

        Robust reducers go to :func:`fedmqtt.aggregation.fedbuff_aggregate`. The plain mean
        (the default) is :func:`fedmqtt.aggregation.mean_of_rows`, the same formula as
        ``fedbuff_aggregate(reducer="mean")`` computed in one float32 BLAS pass.
        """
        n = np.array([p.meta.num_samples for p in self.pending], dtype=np.float32)
        if self.cfg.reducer == "mean":
            return mean_of_rows(x, s, n)
        reducer: Reducer = "median" if self.cfg.reducer == "median" else "trimmed-mean"
        return fedbuff_aggregate(x, s, n, reducer=reducer, trim_fraction=self.cfg.trim_fraction)

    def clear(self) -> None:
        if self.scales is not None:
            self.scales[: len(self.pending)] = 1.0
        self.pending.clear()
        self.pending_ids.clear()
        self.per_device.clear()

    def stats(self) -> dict[str, float]:
        n = len(self.pending)
        if not n:
            return {"updates": 0.0}
        return {
            "updates": float(n),
            "samples": float(sum(p.meta.num_samples for p in self.pending)),
            "mean_staleness": float(np.mean([p.tau for p in self.pending])),
            "max_staleness": float(max(p.tau for p in self.pending)),
        }

    # ------------------------------------------------------------------ policy
    def ready(self, now: float) -> bool:
        """True when the buffer should be aggregated now: it is full (``capacity`` updates) or,
        with ``[strategy] deadline_s > 0``, the deadline has passed (:meth:`deadline_passed`)."""
        return len(self.pending) >= self.capacity or self.deadline_passed(now)

    @property
    def timed(self) -> bool:
        """Whether :meth:`ready` can turn true by the passage of time alone, with no new update
        (a deadline): the service then asks it again periodically (``Engine.tick``)."""
        return self.cfg.deadline_s > 0

    @abstractmethod
    def aggregate(self, params: F32, median_norm: float | None) -> F32:
        """New parameters from ``params`` and the buffer (not modified on error)."""

    def deadline_passed(self, now: float) -> bool:
        """Whether ``[strategy] deadline_s`` (> 0) has passed since the current version was
        made while the buffer holds at least one update."""
        deadline = self.cfg.deadline_s
        return bool(self.pending) and deadline > 0 and now - self.version_started >= deadline

    def on_version(self, version: int, now: float) -> None:
        """Called after every new version (and at start): remembers when it started."""
        self.version_started = now

    # ------------------------------------------------------------------ state
    def extra_state(self) -> dict[str, Any]:
        return {}

    def load_extra(self, state: Mapping[str, Any]) -> None:
        return None

    def to_state(self) -> dict[str, Any]:
        privacy = self.privacy.to_state() if self.privacy is not None else self._privacy_saved
        return {"name": self.name, **self.extra_state(), "privacy": privacy}

    def load_state(self, state: Mapping[str, Any]) -> None:
        if state.get("name") != self.name:
            raise CheckpointError(
                f"the checkpoint was written by strategy {state.get('name')!r}, the config says "
                f"{self.name!r}; restore the old [strategy] or start a new state directory"
            )
        self.clear()
        self.load_extra(state)
        self._privacy_saved = state.get("privacy")
        if self.privacy is not None:
            self.privacy.load_state(self._privacy_saved)


def optimizer_state(opt: ServerStep) -> dict[str, Any]:
    s = opt.to_state()
    if isinstance(opt, AdaptiveOptimizer):
        for key in ("m", "v"):
            s[key] = None if s[key] is None else tensor(s[key])
        return s
    v = s["velocity"]
    return {"lr": s["lr"], "momentum": s["momentum"], "velocity": None if v is None else tensor(v)}


def load_optimizer(
    cfg: StrategyConfig, state: Mapping[str, Any] | None, d: int | None = None
) -> ServerStep:
    """The configured server step. It keeps the checkpointed state when that state belongs to
    the same kind of step: the velocity if the momentum is unchanged, an adaptive optimizer's
    moments and step count if ``server_optimizer`` is unchanged (``server_lr``, ``beta1``,
    ``beta2`` and ``tau`` are always the configured ones). With ``d``, a state whose vectors
    do not have ``d`` values raises CheckpointError."""
    if cfg.server_optimizer in ADAPTIVE:
        opt = adaptive_optimizer(cfg.server_optimizer, cfg.server_lr, cfg.beta1, cfg.beta2, cfg.tau)
        if state is not None and state.get("optimizer") == cfg.server_optimizer:
            m, v, steps = state.get("m"), state.get("v"), state.get("steps", 0)
            try:
                opt = type(opt)(
                    opt.lr,
                    opt.beta1,
                    opt.beta2,
                    opt.tau,
                    None if m is None else f32(m, "server optimizer m"),
                    None if v is None else f32(v, "server optimizer v"),
                    steps,
                )
            except ValueError as e:
                raise CheckpointError(f"server optimizer state: {e}") from None
            if d is not None and opt.m is not None and opt.m.shape[0] != d:
                raise CheckpointError(
                    f"server optimizer state has {opt.m.shape[0]} values, the model {d}"
                )
        return opt
    velocity = None
    if (
        state is not None
        and state.get("optimizer", "sgd") == "sgd"
        and state.get("velocity") is not None
        and float(state.get("momentum", -1.0)) == cfg.momentum
    ):
        velocity = f32(state["velocity"], "server velocity")
    return ServerOptimizer(cfg.server_lr, cfg.momentum, velocity)
