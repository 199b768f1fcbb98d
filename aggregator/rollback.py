"""Rollbacks on the state directory and in the running service (:mod:`aggregator.rollout` has
the design): loading a kept version, the offline rollback, and :class:`RolloutControl`, the
service's part (rollback requests, the evaluation gate, the history)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import numpy as np

from aggregator.checkpoint import CheckpointError, CheckpointStore, decode_state, f32
from aggregator.config import AggregatorConfig
from aggregator.engine import Snapshot
from aggregator.metrics import Metrics
from aggregator.rollout import (
    Evaluation,
    Gate,
    History,
    Release,
    Rollback,
    RollbackError,
    ScoreBook,
    StateLock,
    choose_evaluation,
    take_request,
    write_result,
)
from fedmqtt.params import F32

log = logging.getLogger(__name__)

_DURABLE_WAIT_S = 30.0


@dataclass(frozen=True)
class Kept:
    """A kept version's parameters and strategy state."""

    version: int
    params: F32
    strategy: dict[str, Any] | None


def load_kept(cfg: AggregatorConfig, store: CheckpointStore, version: int) -> Kept:
    """Version ``version`` from its checkpoint; RollbackError naming the kept versions if it
    is not there or not usable."""
    kept = store.versions()
    if version not in kept:
        have = ", ".join(map(str, sorted(kept))) or "none"
        raise RollbackError(
            f"version {version} is not among the kept checkpoints ({have}); [checkpoint] keep "
            "sets how many are kept"
        )
    path = store.path_for(version)
    try:
        state = decode_state(path.read_bytes(), str(path))
    except (OSError, CheckpointError) as e:
        raise RollbackError(f"cannot read {path}: {e}") from None
    if state.get("fingerprint") != cfg.spec.fingerprint() or state.get("version") != version:
        raise RollbackError(f"{path} is not version {version} of this model")
    try:
        params = f32(state.get("params"), "params")
    except CheckpointError as e:
        raise RollbackError(f"{path}: {e}") from None
    if params.shape != (cfg.spec.layout().size,) or not np.isfinite(params).all():
        raise RollbackError(f"{path}: parameters do not fit the model or are not finite")
    strategy = state.get("strategy")
    return Kept(version, params, strategy if isinstance(strategy, dict) else None)


def rollback_offline(cfg: AggregatorConfig, to_version: int) -> int | None:
    """Roll the stopped service's state back to ``to_version`` (a new version, checkpointed);
    returns it, or None if the service is running (it holds the state directory's lock)."""
    from aggregator.engine import Engine
    from aggregator.service import checkpoint_store, open_state

    lock = StateLock(cfg.state_dir)
    if not lock.try_acquire():
        return None
    try:
        metrics = Metrics(cfg.federation.id)
        engine = Engine(cfg, metrics, keys=None)
        open_state(cfg, engine)
        store = checkpoint_store(cfg)
        kept = load_kept(cfg, store, to_version)
        if to_version >= engine.version:
            raise RollbackError(f"version {to_version} is the current version, not an older one")
        v = engine.rollback(kept.params, kept.strategy, to_version, time.monotonic(), manual=True)
        metrics.count_rollback("manual")
        store.write(v, engine.snapshot().data)
        log.warning(
            "rolled back to the parameters of version %d as version %d (operator, offline)",
            to_version,
            v,
        )
        return v
    finally:
        lock.release()


RollbackFn = Callable[[F32, "dict[str, Any] | None", int, bool], Awaitable[int]]


class RolloutControl:
    """The service's rollouts: rollback requests from ``fl-aggregator rollback``, the
    evaluation gate (None: no gate) and the history. :meth:`tick` runs on the event loop."""

    def __init__(
        self,
        cfg: AggregatorConfig,
        *,
        store: CheckpointStore,
        metrics: Metrics,
        history: History,
        gate: Gate | None,
        scores: ScoreBook | None,
        io_x: Executor,
        rollback: RollbackFn,
        durable_version: Callable[[], int],
        release: Callable[[Snapshot], None],
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.metrics = metrics
        self.history = history
        self.gate = gate
        self.scores = scores
        self._io_x = io_x
        self._rollback = rollback
        self._durable_version = durable_version
        self._release = release
        self._busy = False  # a rollback (request or gate) is being made
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_save = 0.0

    # ---- hooks of the publisher (event loop) and the evaluation thread ----
    def published(self, snap: Snapshot) -> None:
        self.history.published(snap.version, snap.created_at, snap.stats)
        if self.gate is not None:
            self.gate.published(snap.version, snap.params, snap.created_at, snap.stats)

    def scored(self, version: int, score: float, metric: str) -> None:
        if self.scores is not None:
            self.scores.put(version, score)
        self.history.update(version, score=round(score, 6), metric=metric)

    # ---- the event loop's regular call ----
    async def tick(self) -> None:
        if not self._busy:
            req = take_request(self.cfg.state_dir)
            if req is not None:
                self._spawn(self._requested(req))
        if self.gate is not None and not self._busy:
            self._judge()
        now = time.monotonic()
        if self.history.dirty and now - self._last_save >= self.cfg.metrics.status_interval_s:
            self._last_save = now
            await asyncio.get_running_loop().run_in_executor(self._io_x, self.history.save)

    async def stop(self) -> None:
        """Cancel a rollback under way (a version already handed to the engine is still made
        and goes into the final checkpoint; a waiting ``fl-aggregator rollback`` times out)."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        self.history.save()

    def _spawn(self, coro: Awaitable[None]) -> None:
        self._busy = True
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._busy = False

        task.add_done_callback(done)

    def _judge(self) -> None:
        assert self.gate is not None
        verdicts, action = self.gate.poll()
        for version, verdict, _score in verdicts:
            self.history.update(version, verdict=verdict)
        if isinstance(action, Release):
            self.metrics.set_released(action.version, self.gate.released_score)
            self._release(Snapshot(0, action.version, b"", action.params, {}, action.created_at))
        elif isinstance(action, Rollback):
            log.warning(
                "evaluation gate: version %d scored %.4f, more than %g below the best recent "
                "(%.4f, version %d): it does not reach the predictors; rolling back to "
                "version %d",
                action.failed,
                action.score,
                self.cfg.rollout.margin,
                action.best,
                action.to_version,
                action.to_version,
            )
            self._spawn(self._gate_rollback(action))

    async def _gate_rollback(self, action: Rollback) -> None:
        assert self.gate is not None
        loop = asyncio.get_running_loop()
        try:
            kept = await loop.run_in_executor(
                self._io_x, load_kept, self.cfg, self.store, action.to_version
            )
            strategy = kept.strategy
        except RollbackError:
            strategy = None  # pruned: its parameters (held by the gate) without its optimizer
        try:
            v = await self._rollback(action.params, strategy, action.to_version, False)
        except Exception:
            log.exception("evaluation gate: the rollback to version %d failed", action.to_version)
            self.gate.rolling_back(None)
            return
        self.gate.rolling_back(v)
        self.metrics.count_rollback("gate")
        log.warning(
            "evaluation gate: version %d = the parameters of version %d", v, action.to_version
        )

    async def _requested(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        result: dict[str, Any] = {"id": rid, "ok": False}
        try:
            to = req.get("to_version")
            if "error" in req or not isinstance(to, int) or isinstance(to, bool) or to < 0:
                raise RollbackError(str(req.get("error", "to_version must be an integer >= 0")))
            current = self._durable_version()
            if to >= current:
                raise RollbackError(f"version {to} is not older than the current {current}")
            loop = asyncio.get_running_loop()
            kept = await loop.run_in_executor(self._io_x, load_kept, self.cfg, self.store, to)
            v = await self._rollback(kept.params, kept.strategy, to, True)
            self.metrics.count_rollback("manual")
            log.warning(
                "rolled back to the parameters of version %d as version %d (operator)", to, v
            )
            deadline = time.monotonic() + _DURABLE_WAIT_S
            while self._durable_version() < v and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            result.update(
                ok=True, to_version=to, new_version=v, durable=self._durable_version() >= v
            )
        except RollbackError as e:
            result["error"] = str(e)
            log.error("rollback request refused: %s", e)
        except Exception as e:  # the service goes on; the operator reads why
            result["error"] = f"{type(e).__name__}: {e}"
            log.exception("rollback request failed")
        await asyncio.get_running_loop().run_in_executor(
            self._io_x, write_result, self.cfg.state_dir, result
        )


def build_control(
    cfg: AggregatorConfig,
    *,
    store: CheckpointStore,
    metrics: Metrics,
    publisher: Any,
    holdout: bool,
    federated: Evaluation | None,
    io_x: Executor,
    rollback: RollbackFn,
    durable_version: Callable[[], int],
) -> RolloutControl:
    """The service's :class:`RolloutControl`, connected to its publisher
    (:class:`aggregator.publisher.Publisher`): the gate's evaluation is the holdout's scores
    when ``holdout``, else ``federated``; with neither the gate says so and does not judge."""
    scores = ScoreBook() if holdout else None
    gate = None
    if cfg.rollout.gate:
        evaluation, source = choose_evaluation(scores, federated)
        if evaluation is None:
            log.warning(
                "[rollout] gate = true, but no evaluation is available (no [evaluation] holdout "
                "and no federated evaluation): every version reaches the predictors unjudged"
            )
        else:
            log.info(
                "evaluation gate on (%s evaluation): a version reaches the predictors when it "
                "scores within %g of the best of the last %d released",
                source,
                cfg.rollout.margin,
                cfg.rollout.last_k,
            )
            if source == "federated":
                log.warning(
                    "the evaluation gate judges by the devices' evaluation reports: a version "
                    "reaches the predictors only once %d devices with [evaluation] have "
                    "reported on it",
                    cfg.rollout.min_reports,
                )
        gate = Gate(cfg.rollout, evaluation, source)
    control = RolloutControl(
        cfg,
        store=store,
        metrics=metrics,
        history=History(cfg.state_dir),
        gate=gate,
        scores=scores,
        io_x=io_x,
        rollback=rollback,
        durable_version=durable_version,
        release=publisher.release,
    )
    publisher.on_published = control.published
    publisher.on_scored = control.scored
    publisher.gated = gate is not None
    return control
