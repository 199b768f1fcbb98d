"""What the service publishes, and when: the newest durable version (model, then its
announcement), the ONNX export, and the evaluation of each published version on the holdout.
After every (re)connection every retained message we own is published again (spec, plan,
model, announcement and the last ONNX export), so nothing depends on the broker, or the
cluster node we reach, still holding a retained message.

Runs on the service's event loop; the payloads (:mod:`aggregator.publish`) are signed and
encoded on the publisher thread, the evaluation on the evaluation thread. Only checkpointed
versions are offered (:meth:`Publisher.offer`): nothing is published that is not on disk.
Versions coalesce: while one is being published, only the newest offered since is kept.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor

from aggregator.config import AggregatorConfig
from aggregator.engine import Snapshot
from aggregator.evaluate import Holdout, evaluate, metric_name
from aggregator.keyframes import DeltaPublisher
from aggregator.metrics import Metrics
from aggregator.mqtt import MqttLink
from aggregator.publish import (
    announce_payload,
    downlink_params,
    model_payload,
    onnx_payload,
    plan_payload,
    spec_payload,
)
from fedmqtt import topics
from fedmqtt.params import F32, Layout
from fedmqtt.signing import Ed25519Signer

log = logging.getLogger(__name__)


class Publisher:
    """Publishes through ``link`` (set before :meth:`run`)."""

    def __init__(
        self,
        cfg: AggregatorConfig,
        metrics: Metrics,
        *,
        signer: Ed25519Signer,
        layout: Layout,
        holdout: Holdout | None,
        plan_revision: int,
        latest: Snapshot,
        pub_x: Executor,
        eval_x: Executor,
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.signer = signer
        self.layout = layout
        self.holdout = holdout
        self.plan_revision = plan_revision
        self.link: MqttLink | None = None
        self.published_version = -1
        self._pub_x, self._eval_x = pub_x, eval_x
        self._latest = latest
        self._wake = asyncio.Event()
        self._republish = False
        self._onnx_version: int | None = None
        self._onnx_payload: bytes | None = None  # the last export published, for republishing
        self._onnx_disabled = False
        self._eval_lock = threading.Lock()
        self._eval_next: tuple[Snapshot, F32 | None] | None = None
        self._eval_running = False
        # Rollout hooks (aggregator.rollback.RolloutControl): each newly published version,
        # each evaluation (version, score, metric; on the evaluation thread). ``gated``: the
        # ONNX export waits for release() (the evaluation gate) instead of following the model.
        self.on_published: Callable[[Snapshot], None] | None = None
        self.on_scored: Callable[[int, float, str], None] | None = None
        self.gated = False
        self._releases: set[asyncio.Task[None]] = set()
        self.deltas = (
            DeltaPublisher(cfg, signer, pub_x, upto=latest.version) if cfg.downlink.delta else None
        )

    def _version_zero(self, snap: Snapshot) -> F32 | None:
        """Version 0 as devices decode it, while it is the current version or a keyframe
        kept (the spec message then tells devices how to build it: publish.genesis_of)."""
        kept = self.deltas.store.frames.get(0) if self.deltas is not None else None
        if kept is not None:
            return kept.params
        return downlink_params(self.cfg, snap)[1] if snap.version == 0 else None

    def offer(self, snap: Snapshot, *, new_version: bool) -> None:
        """``snap`` is durable and the newest; with ``new_version``, publish it when the link
        allows (else it is what the next republication sends)."""
        self._latest = snap
        if new_version:
            self._wake.set()

    async def on_connect(self) -> None:
        """After every (re)connection: republish every retained message (spec, plan, model,
        announcement, ONNX export)."""
        self._republish = True
        self._wake.set()

    async def run(self) -> None:
        """Publish the newest durable version (coalescing), the plan and the ONNX export."""
        wake = self._wake
        assert self.link is not None
        link = self.link
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        fed = cfg.federation.id
        while True:
            await wake.wait()
            wake.clear()
            snap = self._latest
            if not link.connected.is_set():
                continue
            republish, self._republish = self._republish, False
            if republish:
                # The spec before any model that names it (models carry only its fingerprint).
                spec = await loop.run_in_executor(
                    self._pub_x, spec_payload, cfg, self.signer, self._version_zero(snap)
                )
                if not await link.publish(topics.spec(fed), spec, retain=True):
                    self._republish = True
                    continue
                plan = await loop.run_in_executor(
                    self._pub_x, plan_payload, cfg, self.signer, self.plan_revision
                )
                if not await link.publish(topics.plan(fed), plan, retain=True):
                    self._republish = True
            if republish or snap.version > self.published_version:
                sent: F32 | None = None
                if self.deltas is not None:  # [downlink] delta (aggregator.keyframes)
                    published, sent = await self.deltas.publish(link, snap, republish=republish)
                else:
                    payload = await loop.run_in_executor(
                        self._pub_x, model_payload, cfg, self.signer, snap
                    )
                    published = await link.publish(topics.model(fed), payload, retain=True)
                if published and self.deltas is None:
                    # After the model: a device that reads the announcement finds it retained.
                    ann = await loop.run_in_executor(
                        self._pub_x, announce_payload, cfg, self.signer, snap
                    )
                    published = await link.publish(topics.announce(fed), ann, retain=True)
                if published:
                    if snap.version > self.published_version:
                        self.evaluate_soon(snap, sent)
                        if self.on_published is not None:
                            self.on_published(snap)
                    self.published_version = max(self.published_version, snap.version)
                else:
                    self._republish = True
                if not self.gated:
                    await self._maybe_onnx(snap, republish=republish)
                elif republish:  # gated: the last released export, not this version
                    await self._publish_last_onnx()
            if self._latest.version > self.published_version:
                wake.set()

    async def _maybe_onnx(self, snap: Snapshot, *, republish: bool = False) -> None:
        every = self.cfg.onnx.every
        if every <= 0 or self._onnx_disabled or self.link is None:
            return
        if self._onnx_version is not None and snap.version - self._onnx_version < every:
            if republish:
                await self._publish_last_onnx()
            return
        loop = asyncio.get_running_loop()
        try:
            payload = await loop.run_in_executor(
                self._pub_x,
                onnx_payload,
                self.cfg,
                self.signer,
                snap,
            )
        except ImportError as e:
            self._onnx_disabled = True
            log.warning(
                "[onnx] every = %d but the ONNX export is unavailable (%s); install "
                "fedmqtt[onnx] to publish ONNX models",
                every,
                e,
            )
            return
        if await self.link.publish(topics.model_onnx(self.cfg.federation.id), payload, retain=True):
            self._onnx_version, self._onnx_payload = snap.version, payload

    async def _publish_last_onnx(self) -> None:
        """On a reconnection, the same signed export again: the retained one may be gone."""
        if self._onnx_payload is None or self.link is None:
            return
        topic = topics.model_onnx(self.cfg.federation.id)
        if not await self.link.publish(topic, self._onnx_payload, retain=True):
            self._republish = True

    def release(self, snap: Snapshot) -> None:
        """The evaluation gate released ``snap``: its ONNX export may reach the predictors."""
        task = asyncio.get_running_loop().create_task(self._maybe_onnx(snap))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    def evaluate_soon(self, snap: Snapshot | None, sent: F32 | None = None) -> None:
        """Score ``snap`` on the holdout in the evaluation thread (as ``sent``, the model
        devices hold, when given); while one evaluation runs, only the newest version asked for
        since is kept (a slow holdout never queues up)."""
        if self.holdout is None or snap is None:
            return
        with self._eval_lock:
            pending, self._eval_next = self._eval_next, (snap, sent)
            if pending is not None or self._eval_running:
                return
            self._eval_running = True
        self._eval_x.submit(self._evaluate_loop)

    def _evaluate_loop(self) -> None:
        metric = metric_name(self.cfg.spec)
        holdout = self.holdout
        assert holdout is not None
        while True:
            with self._eval_lock:
                item, self._eval_next = self._eval_next, None
                if item is None:
                    self._eval_running = False
                    return
            snap, sent = item
            try:
                # The model as devices decode it (the [downlink] codec), not the float32 one.
                if sent is None:
                    _, sent = downlink_params(self.cfg, snap)
                score = evaluate(self.cfg.spec, self.layout, sent, holdout)
            except Exception:
                log.exception("evaluation of version %d failed", snap.version)
                continue
            if self.metrics.eval_version is None or snap.version >= self.metrics.eval_version:
                self.metrics.set_evaluation(snap.version, score, metric)
                log.info("version %d: holdout %s %.4f", snap.version, metric, score)
            if self.on_scored is not None:
                self.on_scored(snap.version, score, metric)
