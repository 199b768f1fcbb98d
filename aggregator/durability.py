"""When updates may be acknowledged: the acknowledgement queue and the checkpoints.

An update is PUBACKed to the broker only after the checkpoint of the flush that applies it is
on disk (docs/aggregator.md has the argument); until then the broker keeps it in flight in our
persistent session. A checkpoint is due after every flush of the buffer; while one is being
written, later flushes coalesce into the next one, and ``[checkpoint] min_interval_s`` paces
them unless the acknowledgement window is half full or the service is stopping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from typing import Any

from aggregator.checkpoint import CheckpointStore
from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, Snapshot
from aggregator.metrics import Metrics
from aggregator.sources import Source

log = logging.getLogger(__name__)


class AckQueue:
    """Messages waiting for the checkpoint of the flush that covers them, in arrival order.

    PUBACKs leave in the order the messages arrived (MQTT requires it): a refused message that
    needs nothing durable still waits behind an accepted one that arrived before it.
    """

    def __init__(self) -> None:
        self._q: deque[tuple[Any, int]] = deque()

    def __len__(self) -> int:
        return len(self._q)

    def add(self, handles: Iterable[Any], needs: Iterable[int]) -> None:
        self._q.extend(zip(handles, needs, strict=True))

    def blocked_by_buffer(self, flushes: int) -> int:
        """Messages that cannot be acknowledged before a flush that has not happened yet (the
        first one needing flush ``flushes + 1`` and everything behind it)."""
        for i, (_, need) in enumerate(self._q):
            if need > flushes:
                return len(self._q) - i
        return 0

    def release(self, durable: int) -> list[Any]:
        """Handles whose flush is durable, from the front, stopping at the first that is not."""
        out = []
        q = self._q
        while q and q[0][1] <= durable:
            out.append(q.popleft()[0])
        return out


class Durability:
    """The acknowledgement queue and the checkpoints of one service, on its event loop.

    ``on_durable(snapshot, new_version)`` runs after every checkpoint; ``on_fatal(error)`` when
    a checkpoint cannot be written (the service must stop: nothing could be acknowledged).
    """

    def __init__(
        self,
        cfg: AggregatorConfig,
        engine: Engine,
        store: CheckpointStore,
        metrics: Metrics,
        *,
        latest: Snapshot,
        engine_x: Executor,
        io_x: Executor,
        on_durable: Callable[[Snapshot, bool], None],
        on_fatal: Callable[[BaseException], None],
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.store = store
        self.metrics = metrics
        self.acks = AckQueue()
        self.durable_flushes = self.engine_flushes = latest.flushes
        self.durable_version = self.engine_version = latest.version
        self.stopping = False
        self._engine_x, self._io_x = engine_x, io_x
        self._on_durable, self._on_fatal = on_durable, on_fatal
        self._ckpt_task: asyncio.Task[None] | None = None
        self._ckpt_wanted = False
        self._ckpt_started = -float("inf")  # monotonic start of the last checkpoint
        self._ckpt_hurry: asyncio.Event | None = None  # cuts a checkpoint's pacing wait short

    def applied(self, source: Source, handles: Iterable[Any], needs: Iterable[int]) -> None:
        """Messages of ``source`` the engine applied, with the flush each needs durable."""
        self.acks.add([(source, h) for h in handles], needs)

    def made(self, flushes: int, version: int) -> None:
        """The engine is at flush ``flushes``, version ``version``."""
        self.engine_flushes, self.engine_version = flushes, version

    def stop(self) -> None:
        """From now on checkpoints are not paced."""
        self.stopping = True
        if self._ckpt_hurry is not None:
            self._ckpt_hurry.set()

    async def finish(self, *, clean: bool) -> None:
        """Wait for the checkpoint being written; then, if ``clean``, write a last one."""
        if self._ckpt_task is not None:
            await self._ckpt_task
        if clean:
            await self.checkpoint()

    def release(self) -> None:
        ready = self.acks.release(self.durable_flushes)
        by_source: dict[Source, list[Any]] = {}
        for source, handle in ready:
            by_source.setdefault(source, []).append(handle)
        for source, handles in by_source.items():
            source.ack(handles)

    def _checkpoint_due(self) -> bool:
        """A checkpoint is due whenever the buffer was flushed since the last one."""
        return self.engine_flushes > self.durable_flushes

    def maybe_checkpoint(self) -> None:
        if self._ckpt_task is not None and not self._ckpt_task.done():
            self._ckpt_wanted = True
            if self._ckpt_hurry is not None and self._must_hurry():
                self._ckpt_hurry.set()
            return
        if self._checkpoint_due():
            self._ckpt_task = asyncio.create_task(self._checkpoint_then_more())

    def _must_hurry(self) -> bool:
        """Whether a checkpoint should start without waiting out ``min_interval_s``: when
        stopping, or when half the Receive Maximum window awaits acknowledgement (at 10,000
        small updates a second, 0.1 s of them would fill a window of 1,000 and stall the
        stream until the checkpoint)."""
        return self.stopping or 2 * len(self.acks) >= self.cfg.limits.inflight_window

    async def _pace_checkpoint(self) -> None:
        """Wait until ``[checkpoint] min_interval_s`` after the previous checkpoint started.

        Each checkpoint writes and fsyncs the whole model and is followed by publishing it
        (retained, to every device), so under a fast stream checkpointing every version cost
        CPU on both the aggregator and the broker: at d = 1e5 int8, ~23 checkpoints a second
        against ~10 with 0.1 s, and ~10 % more CPU per update (docs/benchmarks.md). Updates
        keep being applied meanwhile; only their PUBACKs wait the extra time."""
        wait = self._ckpt_started + self.cfg.checkpoint.min_interval_s - time.monotonic()
        if wait <= 0 or self._must_hurry():
            return
        hurry = self._ckpt_hurry = asyncio.Event()
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), wait)
        finally:
            self._ckpt_hurry = None

    async def _checkpoint_then_more(self) -> None:
        try:
            await self._pace_checkpoint()
            await self.checkpoint()
        except Exception as e:
            # A checkpoint that cannot be written (disk full, I/O error) must stop the service:
            # without it nothing can be acknowledged and ingestion would silently stall.
            log.error("cannot write a checkpoint: %s", e)
            self._on_fatal(e)
            return
        if self._ckpt_wanted:
            self._ckpt_wanted = False
            if self._checkpoint_due():
                self._ckpt_task = asyncio.create_task(self._checkpoint_then_more())

    async def checkpoint(self) -> None:
        loop = asyncio.get_running_loop()
        self._ckpt_started = time.monotonic()
        snap = await loop.run_in_executor(self._engine_x, self.engine.snapshot)
        t0 = time.perf_counter()
        await loop.run_in_executor(self._io_x, self.store.write, snap.version, snap.data)
        self.metrics.record_checkpoint(time.perf_counter() - t0)
        self.durable_flushes = max(self.durable_flushes, snap.flushes)
        new_version = snap.version > self.durable_version
        self.durable_version = max(self.durable_version, snap.version)
        self.release()
        if new_version:
            log.info(
                "version %d checkpointed (%s)",
                snap.version,
                ", ".join(f"{k} {v:g}" for k, v in snap.stats.items()),
            )
        self._on_durable(snap, new_version)
