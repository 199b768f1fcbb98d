"""The aggregator service: MQTT in, validated updates into the model, checkpoints, publishing.

Threads and what runs where:

* the **event loop** (the caller's) does MQTT I/O through :class:`aggregator.mqtt.MqttLink`,
  acknowledgements, publishing, timers and ``status.json``; it never touches numpy;
* the **engine thread** (one worker of an executor) runs :class:`aggregator.engine.Engine`:
  verify, decode, aggregate, and encode snapshots -- one batch at a time, in arrival order;
* an **I/O thread** writes checkpoints (``fsync``) so the engine keeps going meanwhile;
* a **publisher thread** signs and encodes model / ONNX payloads and runs the evaluation.

Delivery guarantee (docs/aggregator.md has the full argument): an update is PUBACKed to the
broker only after the checkpoint of the version that applies it is on disk
(:mod:`aggregator.durability`); until then the broker keeps it in flight in our persistent
session. Nothing is published that is not on disk either (:mod:`aggregator.publisher`). So
a ``kill -9`` at any instant loses nothing the broker considers delivered (the broker
redelivers every unacknowledged update) and applies nothing twice (the checkpointed replay
window refuses redelivered updates that were already applied).

A checkpoint is written after every flush of the buffer (a new version). While one is being
written, later versions coalesce into the next one: an intermediate version that existed only
between two checkpoints is never published.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import fedmqtt
from aggregator.checkpoint import CheckpointError, CheckpointStore
from aggregator.cohort import warn_if_thin
from aggregator.config import (
    AggregatorConfig,
    buffer_capacity,
    devices_needed,
    window_pressure,
)
from aggregator.cpu import cpu_for, pin_current_thread, restore_affinity, usable_cpus
from aggregator.devices import DeviceKeys
from aggregator.durability import Durability
from aggregator.engine import Engine, Snapshot, UpdateObserver
from aggregator.evaluate import Holdout, load_holdout
from aggregator.fleet import attach, device_status, restore_fleet, save_fleet_state
from aggregator.memtune import tune_malloc
from aggregator.metrics import Metrics, serve_prometheus
from aggregator.mqtt import MqttLink
from aggregator.publish import plan_extra, plan_revision
from aggregator.publisher import Publisher
from aggregator.rollback import RolloutControl, build_control
from aggregator.rollout import Evaluation, StateLock
from aggregator.sources import LinkSource, PoolSource, Source
from aggregator.statusfile import write_status
from fedmqtt import topics
from fedmqtt.errors import ConfigError
from fedmqtt.fedeval import EvalSummary
from fedmqtt.params import F32
from fedmqtt.sdnotify import Notifier
from fedmqtt.signing import Ed25519Signer

if TYPE_CHECKING:
    from aggregator.workers import WorkerPool

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
# fleet.json is rewritten at most this often (and at a clean stop): with 10,000 devices it is
# a few MB, written by the thread that also writes checkpoints.
FLEET_SAVE_S = 30.0
_TICK_S = 0.1


def checkpoint_store(cfg: AggregatorConfig) -> CheckpointStore:
    return CheckpointStore(cfg.state_dir / CHECKPOINT_DIR, keep=cfg.checkpoint.keep)


def open_state(cfg: AggregatorConfig, engine: Engine) -> Path:
    """Bring ``engine`` to the newest checkpoint in the state directory, creating the directory
    and the version-0 checkpoint (``engine``'s initial state) if there is none; returns the
    checkpoint's path.

    The one way the state is opened (``fl-aggregator init`` and the service). Raises
    ConfigError if the state belongs to another federation or model (the message says how to
    proceed) or no state file can be read.
    """
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = checkpoint_store(cfg)
    try:
        loaded = store.load_latest()
        if loaded is not None:
            engine.restore(loaded.state)
            return loaded.path
    except CheckpointError as e:
        raise ConfigError(f"state directory {cfg.state_dir}: {e}") from None
    path = store.write(engine.version, engine.snapshot().data)
    log.info("initialised %s with the version-0 model", cfg.state_dir)
    return path


def initialize(cfg: AggregatorConfig) -> int:
    """``fl-aggregator init``: :func:`open_state` without a service; returns the version."""
    engine = Engine(cfg, Metrics(cfg.federation.id), keys=None)
    open_state(cfg, engine)
    return engine.version


def warn_if_unfillable(cfg: AggregatorConfig, keys: DeviceKeys) -> None:
    """Log a warning if fewer devices are enrolled than a buffer needs under
    ``max_per_device``: it would then fill only by partial flushes, if at all."""
    need, enrolled = devices_needed(cfg.strategy), keys.enrolled()
    if need > enrolled:
        log.warning(
            "[strategy] %s needs updates from at least %d devices (max_per_device %d) but %d "
            "are enrolled: raise max_per_device (0 = unbounded) for a smaller federation",
            cfg.strategy.name,
            need,
            cfg.strategy.max_per_device,
            enrolled,
        )


class Aggregator:
    """The service. ``await run(stop)`` until ``stop`` is set; ``snapshot()`` from any thread."""

    def __init__(
        self, config: AggregatorConfig, *, on_update: UpdateObserver | None = None
    ) -> None:
        self.cfg = config
        self.on_update = on_update
        self.metrics = Metrics(config.federation.id)
        self.ready = threading.Event()
        self.plan_revision = 0
        self._latest: Snapshot | None = None
        self._stopping = False
        self._window_pressure = window_pressure(config)
        self._buffer_rows = buffer_capacity(config.strategy)
        self._publisher: Publisher | None = None
        self._link: MqttLink | None = None
        self._pool: WorkerPool | None = None  # when [scaleout] workers > 0
        self._cpus: list[int] = []  # usable CPUs before pinning ([scaleout] pin_cpu), or none
        self._fatal: BaseException | None = None
        self._background: set[asyncio.Task[Any]] = set()  # keeps fire-and-forget tasks alive
        self._fatal_event: asyncio.Event | None = None
        self._fleet_saved = 0.0  # monotonic time of the last fleet.json write
        self._state_lock = StateLock(config.state_dir)  # held while running (rollback offline)
        self._rollout: RolloutControl | None = None

    # ------------------------------------------------------------------ public
    def snapshot(self) -> dict[str, Any]:
        """Version, counters, staleness histogram, last accuracy, devices online (read-only)."""
        return self.metrics.snapshot()

    def federated_eval(self, version: int) -> EvalSummary | None:
        """The devices' federated evaluation of ``version`` (:mod:`aggregator.fedeval`):
        sample-weighted metric and loss, devices, p10/p90; None if no device reported on it
        (yet). Safe from any thread."""
        engine = getattr(self, "engine", None)
        return engine.evals.federated_eval(version) if engine is not None else None

    async def run(self, stop: asyncio.Event) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        tune_malloc()
        # Before any executor thread exists, so that they all inherit the CPU (aggregator/cpu.py).
        self._cpus = usable_cpus() if cfg.scaleout.pin_cpu else []
        unpinned = usable_cpus()
        pinned = pin_current_thread(cpu_for(0, self._cpus), "aggregator")
        notifier = Notifier.from_env()
        engine_x = ThreadPoolExecutor(1, thread_name_prefix="agg-engine")
        io_x = ThreadPoolExecutor(1, thread_name_prefix="agg-io")
        pub_x = ThreadPoolExecutor(1, thread_name_prefix="agg-publish")
        eval_x = ThreadPoolExecutor(1, thread_name_prefix="agg-evaluate")
        self._engine_x, self._io_x, self._pub_x, self._eval_x = engine_x, io_x, pub_x, eval_x
        prom = None
        try:
            self.signer = await loop.run_in_executor(
                io_x, Ed25519Signer.load, cfg.security.signing_key
            )
            self.store = checkpoint_store(cfg)
            await loop.run_in_executor(io_x, self._state_lock.acquire)
            self.keys = DeviceKeys(cfg.security.devices_dir)
            self.engine = Engine(cfg, self.metrics, self.keys)
            self.engine.on_update = self.on_update
            await loop.run_in_executor(io_x, warn_if_unfillable, cfg, self.keys)
            await loop.run_in_executor(io_x, warn_if_thin, cfg)
            path = await loop.run_in_executor(engine_x, open_state, cfg, self.engine)
            self._latest = await loop.run_in_executor(engine_x, self.engine.snapshot)
            await loop.run_in_executor(io_x, restore_fleet, cfg.state_dir, self.engine)
            attach(self.metrics, self.engine, per_device=cfg.metrics.per_device)
            self._durability: Durability = Durability(
                cfg,
                self.engine,
                self.store,
                self.metrics,
                latest=self._latest,
                engine_x=engine_x,
                io_x=io_x,
                on_durable=self._durable,
                on_fatal=self._fail,
            )
            self.holdout: Holdout | None = None
            if cfg.evaluation.holdout is not None:
                self.holdout = await loop.run_in_executor(
                    io_x, load_holdout, cfg.evaluation.holdout, cfg.spec
                )
            self.plan_revision = await loop.run_in_executor(
                io_x, plan_revision, cfg.state_dir, cfg.plan, plan_extra(cfg.privacy)
            )
            log.info(
                "resuming federation %s at version %d from %s",
                cfg.federation.id,
                self._latest.version,
                path,
            )
            if cfg.metrics.prometheus_port:
                prom = serve_prometheus(self.metrics, cfg.metrics.prometheus_port, cfg.metrics.bind)
            await self._serve(stop, notifier)
        finally:
            engine = getattr(self, "engine", None)
            if engine is not None:
                engine.close()
            if prom is not None:
                prom.shutdown()
            for x in (engine_x, io_x, pub_x, eval_x):
                x.shutdown(wait=True)
            self._state_lock.release()
            if pinned:  # the caller's thread (the simulator's, a test's) gets its CPUs back
                restore_affinity(unpinned)

    # ------------------------------------------------------------------ main loop
    async def _serve(self, stop: asyncio.Event, notifier: Notifier) -> None:
        cfg = self.cfg
        fed = cfg.federation.id
        assert self._latest is not None
        publisher = self._publisher = Publisher(
            cfg,
            self.metrics,
            signer=self.signer,
            layout=self.engine.layout,
            holdout=self.holdout,
            plan_revision=self.plan_revision,
            latest=self._latest,
            pub_x=self._pub_x,
            eval_x=self._eval_x,
        )
        subs = [topics.status_filter(fed), topics.eval_filter(fed)]
        if cfg.scaleout.workers == 0:
            subs.insert(0, topics.updates_filter(fed))
        link_stop = asyncio.Event()
        self._link = link = MqttLink(
            cfg.broker,
            subscriptions=subs,
            receive_maximum=cfg.limits.inflight_window,
            unsubscriptions=topics.update_filters_of_other_configs(cfg.scaleout.group, fed),
            on_connect=publisher.on_connect,
            on_state=self.metrics.set_connected,
            name="aggregator",
        )
        publisher.link = link
        self._rollout = build_control(
            cfg,
            store=self.store,
            metrics=self.metrics,
            publisher=publisher,
            holdout=self.holdout is not None,
            federated=self.federated_evaluation(),
            io_x=self._io_x,
            rollback=self._rollback,
            durable_version=lambda: self._durability.durable_version,
        )
        tasks = [
            asyncio.create_task(link.run(link_stop), name="mqtt"),
            asyncio.create_task(publisher.run(), name="publisher"),
            asyncio.create_task(self._housekeeping(notifier), name="housekeeping"),
        ]
        if cfg.scaleout.workers:
            from aggregator.workers import WorkerPool

            pool = self._pool = WorkerPool(cfg, self._cpus)
            await pool.start()
            workers = PoolSource(pool)
            tasks.append(asyncio.create_task(self._ingest(workers), name="ingest-workers"))
        tasks.append(asyncio.create_task(self._ingest(LinkSource(link)), name="ingest"))
        self._fatal_event = asyncio.Event()
        stop_task = asyncio.create_task(stop.wait(), name="stop")
        fatal_task = asyncio.create_task(self._fatal_event.wait(), name="fatal")
        publisher.evaluate_soon(self._latest)
        clean = False
        try:
            # Ready once the subscription is up: updates published from now on reach us.
            ready = asyncio.create_task(self._all_connected())
            await asyncio.wait(
                [ready, stop_task, fatal_task, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            ready.cancel()
            self.ready.set()
            notifier.notify(READY="1", STATUS=f"version {self._durability.durable_version}")
            done, _ = await asyncio.wait(
                [stop_task, fatal_task, *tasks], return_when=asyncio.FIRST_COMPLETED
            )
            if self._fatal is not None:
                raise self._fatal
            for t in done:
                if t in tasks and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            clean = True
        finally:
            notifier.notify(STOPPING="1")
            # After an error the in-memory state is not trusted: no final checkpoint; the
            # broker redelivers whatever was not acknowledged.
            await self._shutdown(tasks, link_stop, clean=clean)
            stop_task.cancel()
            fatal_task.cancel()

    async def _all_connected(self) -> None:
        assert self._link is not None
        await self._link.connected.wait()
        if self._pool is not None:
            await self._pool.all_ready.wait()

    async def _shutdown(
        self, tasks: list[asyncio.Task[Any]], link_stop: asyncio.Event, *, clean: bool
    ) -> None:
        self._stopping = True
        if self._rollout is not None:
            await self._rollout.stop()
        self._durability.stop()
        ingest = [t for t in tasks if t.get_name().startswith("ingest")]
        await asyncio.gather(*ingest, return_exceptions=True)
        # Final checkpoint, then acknowledge what it covers while still connected. Written even
        # without a new version: the counters of refused messages (acknowledged at once) have
        # no other way to disk, and a clean stop should lose nothing.
        with contextlib.suppress(Exception):
            await self._durability.finish(clean=clean)
        await asyncio.sleep(0.05)  # let the PUBACKs reach the socket before DISCONNECT
        if self._pool is not None:
            await self._pool.stop()
        link_stop.set()
        for t in tasks:
            if t.get_name() in ("publisher", "housekeeping"):
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._rollout is not None:
            with contextlib.suppress(Exception):
                self._rollout.close()
        with contextlib.suppress(Exception):
            await asyncio.get_running_loop().run_in_executor(
                self._io_x, write_status, self.cfg.state_dir, self._status("stopped")
            )
        await asyncio.get_running_loop().run_in_executor(self._io_x, self._save_fleet)

    # ------------------------------------------------------------------ ingestion
    async def _ingest(self, source: Source) -> None:
        """Batches from ``source`` through the engine, in arrival order; their
        acknowledgements wait for the checkpoint that covers them (:mod:`aggregator.durability`)."""
        loop = asyncio.get_running_loop()
        batch_max = self.cfg.limits.batch_max
        engine = self.engine
        while not self._stopping:
            taken = await source.take(batch_max, 0.2)
            if taken is None:
                continue
            handles, items = taken

            def work(items: list[Any] = items) -> tuple[list[int], int, int]:
                return (
                    source.apply(engine, items, time.monotonic()),
                    engine.flushes,
                    engine.version,
                )

            needs, flushes, version = await loop.run_in_executor(self._engine_x, work)
            source.applied(handles)
            self._durability.applied(source, handles, needs)
            self._after_batch(flushes, version)
            await self._relieve_window()

    def _after_batch(self, flushes: int, version: int) -> None:
        durability = self._durability
        durability.made(flushes, version)
        durability.release()
        durability.maybe_checkpoint()

    async def _relieve_window(self) -> None:
        """Flush a partial buffer when the messages awaiting acknowledgement nearly fill the
        Receive Maximum window.

        PUBACKs must leave in arrival order, so every message that arrives after a buffered
        update -- a refused one, a presence message -- waits for the flush that applies it.
        Without this, a stream of refused messages (a hostile device) or of presence messages
        (1,500 agents connecting) could fill the window while the buffer waits for its K-th
        update, which the broker then never sends: the service would stall for good.
        """
        # Messages waiting only for a checkpoint of a flush already made are released when it
        # is durable; only those stuck behind the unfilled buffer call for an early flush.
        acks = self._durability.acks
        if len(acks) < self._window_pressure:
            return
        if acks.blocked_by_buffer(self._durability.engine_flushes) < self._window_pressure:
            return
        engine = self.engine
        loop = asyncio.get_running_loop()

        def work() -> tuple[int, int, int]:
            return engine.flush_partial(time.monotonic()), engine.flushes, engine.version

        held, flushes, version = await loop.run_in_executor(self._engine_x, work)
        if held:
            self.metrics.partial_flushes += 1
            log.log(
                # A window below the buffer ([limits] broker_inflight) makes this every flush.
                logging.DEBUG if self._window_pressure < self._buffer_rows else logging.INFO,
                "%d messages await acknowledgement (window %d): applied a partial buffer of "
                "%d update(s) early",
                len(acks),
                self.cfg.limits.inflight_window,
                held,
            )
            self._after_batch(flushes, version)

    async def _rollback(
        self, params: F32, strategy: dict[str, Any] | None, to_version: int, manual: bool
    ) -> int:
        """A new version with ``params`` (those of ``to_version``), made on the engine thread
        and checkpointed and published like any other (aggregator/rollout.py)."""
        engine = self.engine

        def work() -> tuple[int, int, int]:
            v = engine.rollback(params, strategy, to_version, time.monotonic(), manual=manual)
            return v, engine.flushes, engine.version

        v, flushes, version = await asyncio.get_running_loop().run_in_executor(self._engine_x, work)
        self._after_batch(flushes, version)
        return v

    def federated_evaluation(self) -> Evaluation | None:
        """The federated evaluation the gate uses when there is no ``[evaluation] holdout``:
        version -> the devices' sample-weighted metric (:meth:`federated_eval`), or None while
        fewer than ``[rollout] min_reports`` devices have reported on it."""
        need = self.cfg.rollout.min_reports

        def score(version: int) -> float | None:
            summary = self.federated_eval(version)
            return summary.metric if summary is not None and summary.devices >= need else None

        return score

    def _durable(self, snap: Snapshot, new_version: bool) -> None:
        self._latest = snap
        if self._publisher is not None:
            self._publisher.offer(snap, new_version=new_version)

    def _fail(self, e: BaseException) -> None:
        self._fatal = e
        if self._fatal_event is not None:
            self._fatal_event.set()

    # ------------------------------------------------------------------ periodic work
    async def _housekeeping(self, notifier: Notifier) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        last_status = last_metrics = last_watchdog = 0.0
        timed = self.engine.timed
        while True:
            await asyncio.sleep(_TICK_S)
            now = time.monotonic()
            if timed and not self._stopping:

                def tick(engine: Engine = self.engine) -> tuple[bool, int, int]:
                    return engine.tick(time.monotonic()), engine.flushes, engine.version

                made, flushes, version = await loop.run_in_executor(self._engine_x, tick)
                if made:
                    self._durability.made(flushes, version)
            self._durability.maybe_checkpoint()
            if self._rollout is not None and not self._stopping:
                await self._rollout.tick()
            if now - last_status >= cfg.metrics.status_interval_s:
                last_status = now
                self._write_status_soon()
            link = self._link
            if (
                now - last_metrics >= cfg.metrics.publish_interval_s
                and link is not None
                and link.connected.is_set()
            ):
                last_metrics = now
                payload = self.metrics.message(cfg.metrics.format)
                task = asyncio.create_task(
                    link.publish(topics.metrics(cfg.federation.id), payload, retain=True)
                )
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            interval = notifier.watchdog_interval_s
            if interval is not None and now - last_watchdog >= interval:
                last_watchdog = now
                notifier.notify(WATCHDOG="1")

    def _status(self, state: str) -> dict[str, Any]:
        s = self.metrics.snapshot()
        s.update(
            ready=self.ready.is_set(),
            state=state,
            pid=os.getpid(),
            fedmqtt_version=fedmqtt.__version__,
            strategy=self.cfg.strategy.name,
            plan_revision=self.plan_revision,
            durable_version=self._durability.durable_version,
            published_version=(
                self._publisher.published_version if self._publisher is not None else -1
            ),
            status_interval_s=self.cfg.metrics.status_interval_s,
            **device_status(self.engine),
        )
        return s

    def _write_status_soon(self) -> None:
        status = self._status("running")
        self._io_x.submit(write_status, self.cfg.state_dir, status)
        now = time.monotonic()
        changed = self.engine.telemetry.changed or self.engine.evals.changed
        if changed and now - self._fleet_saved >= FLEET_SAVE_S:
            self._fleet_saved = now
            self._io_x.submit(self._save_fleet)

    def _save_fleet(self) -> None:
        try:
            save_fleet_state(self.cfg.state_dir, self.engine)
        except OSError as e:
            log.error("cannot write the fleet file in %s: %s", self.cfg.state_dir, e)
