"""What the service publishes, and when: the newest durable version (model, then its
announcement), the spec and the plan after every (re)connection, the ONNX export, and the
evaluation of each published version on the holdout.

Runs on the service's event loop; the payloads (:mod:`aggregator.publish`) are signed and
encoded on the publisher thread, the evaluation on the evaluation thread. Only checkpointed
versions are offered (:meth:`Publisher.offer`): nothing is published that is not on disk.
Versions coalesce: while one is being published, only the newest offered since is kept.
"""

from __future__ import annotations

import asyncio
import logging
import threading
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
        self._onnx_disabled = False
        self._eval_lock = threading.Lock()
        self._eval_next: tuple[Snapshot, F32 | None] | None = None
        self._eval_running = False
        self.deltas = (
            DeltaPublisher(cfg, signer, pub_x, upto=latest.version) if cfg.downlink.delta else None
        )

    def offer(self, snap: Snapshot, *, new_version: bool) -> None:
        """``snap`` is durable and the newest; with ``new_version``, publish it when the link
        allows (else it is what the next republication sends)."""
        self._latest = snap
        if new_version:
            self._wake.set()

    async def on_connect(self) -> None:
        """After every (re)connection: republish the plan and the current model (retained)."""
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
                spec = await loop.run_in_executor(self._pub_x, spec_payload, cfg, self.signer)
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
                    self.published_version = max(self.published_version, snap.version)
                else:
                    self._republish = True
                await self._maybe_onnx(snap)
            if self._latest.version > self.published_version:
                wake.set()

    async def _maybe_onnx(self, snap: Snapshot) -> None:
        every = self.cfg.onnx.every
        if every <= 0 or self._onnx_disabled or self.link is None:
            return
        if self._onnx_version is not None and snap.version - self._onnx_version < every:
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
            self._onnx_version = snap.version

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
