"""The aggregator's state machine: validate updates, buffer them, aggregate, snapshot.

Everything here is synchronous and runs on ONE thread (the service's engine executor), so the
model state needs no locks and the MQTT event loop never waits for numpy or hashing. The
service hands over batches of raw messages (:meth:`Engine.process`) -- or, with scale-out
workers, updates that a worker already authenticated and decoded
(:meth:`Engine.process_verified`) -- and asks for :meth:`Engine.snapshot` when a checkpoint is
due.

Durability bookkeeping: :attr:`Engine.flushes` counts the times the buffer was turned into a
version (or, in the last-resort error path, dropped). An update is acknowledged to the broker
only once the flush that applies it is in a durable checkpoint; until then the broker keeps it
in flight in our persistent session, so the buffer itself never has to be written to disk. For
every message ``process`` returns that flush number: ``flushes + 1`` for an update accepted into
the buffer (every strategy empties the whole buffer when it aggregates); for a replay, the flush
that applies or applied the original (acknowledging a duplicate earlier would let the broker
forget an update that exists only in memory); 0 for other refusals, which change nothing that
must survive. Snapshots leave out the buffered updates (their rows, their ids in the replay
window, their counts): after a crash the broker redelivers them.

Held updates (FedBuff without a cohort draw): an update over its device's ``max_per_device``
rows of the buffer -- typically a late update on an older version took the device's row, and
its update on the newest one follows -- is not refused but held, as received, for the next
buffer: ``flushes + 2``. At most one per device is held, and only an update within
``max_staleness`` of the next version (so FedAvg, which takes only the current version, holds
none); any other is refused as ``device_quota``, as before. Of two updates of one device over
the quota, the one it made later (higher ``seq``; on a tie, the one received later) is held and
the other refused as ``superseded``: a device whose uploads arrive in a burst (a lagging or
restored link) keeps its freshest update, as its outbox keeps only the newest unsent one.
While an update is held no flush happens, so the one held in its place waits for the same
flush. Only a device holding rows of the buffer has one held, so they never number more than
the buffer's capacity: all fit in the next buffer. Every flush re-applies the held updates at
once into the buffer it empties, so they are in the buffer of flush ``flushes + 2`` of the
moment they were held (a rollback applies that buffer before its own flush): they are
checked again there (staleness, replay, the strategy's admission; not the rate, already
taken) and accepted or refused.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from aggregator.checkpoint import FORMAT_VERSION as STATE_FORMAT
from aggregator.checkpoint import CheckpointError, encode_state, f32, tensor
from aggregator.cohort import cohort_gate
from aggregator.config import AggregatorConfig
from aggregator.devices import DeviceKeys
from aggregator.evaluate import metric_name
from aggregator.fedeval import FederatedEval
from aggregator.metrics import Metrics, RejectionLog
from aggregator.presence import Presence
from aggregator.privacy import PrivacyState
from aggregator.ratelimit import DeviceRate
from aggregator.replay import ReplayWindow
from aggregator.strategies import Strategy, build_strategy
from aggregator.telemetry import DeviceTelemetry
from aggregator.validate import (
    NormGate,
    ReplayError,
    UpdateMeta,
    check_replay,
    check_staleness,
    decode_delta,
    limits_for,
    open_update,
    scale_segments,
)
from fedmqtt import topics
from fedmqtt.aggregation.threshold import ThresholdEstimator
from fedmqtt.codecs import decode_params
from fedmqtt.errors import DEVICE_QUOTA, HELD, REPLAY, SUPERSEDED, RejectedError
from fedmqtt.models import init_params
from fedmqtt.models.anomaly import quantile_level
from fedmqtt.params import F32
from fedmqtt.signing import CHACHA20_POLY1305
from fedmqtt.wire import unpack_map

log = logging.getLogger(__name__)

# Messages are opened on several threads only above this mean size (see Engine._open_all),
# counting only the messages of devices whose MAC or signature is slow enough to be worth it.
PARALLEL_MIN_MEAN_BYTES = 32 * 1024
# A MAC this cheap is checked on the engine thread: handing half a batch to another thread
# costs more than it saves (docs/benchmarks.md, "The engine alone").
CHEAP_AUTH_ALGS: Final = frozenset({CHACHA20_POLY1305})


@dataclass(frozen=True, slots=True)
class _Eval:
    """An evaluation report of ``device`` (checked by :mod:`aggregator.fedeval`)."""

    device: str
    payload: bytes = b""


# An opened update, its refusal, the device of a presence message, or an evaluation report.
_Opened = tuple[UpdateMeta, dict[str, Any]] | RejectedError | str | _Eval


@dataclass(frozen=True, slots=True)
class _Update:
    """An update message opened on the engine thread (``delta`` still encoded), or refused."""

    delta: dict[str, Any]
    topic: str
    nbytes: int
    meta: UpdateMeta | None
    refused: RejectedError | None


@dataclass(frozen=True, slots=True)
class _Presence:
    device: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Verified:
    """An update a worker process authenticated and decoded (or refused, with ``reason``)."""

    device: str
    nbytes: int
    meta: UpdateMeta | None = None
    norm: float = 0.0
    delta: bytes | memoryview = b""
    reason: str | None = None
    detail: str = ""
    encoded: bool = False  # ``delta`` is the msgpack wire encoding, not float32 bytes


_Entry = _Update | _Presence | _Eval


@dataclass(frozen=True)
class Snapshot:
    """The durable state after flush ``flushes``: encoded bytes plus what publishing needs."""

    flushes: int
    version: int
    data: bytes
    params: F32
    stats: dict[str, float]
    created_at: float
    threshold: float | None = None  # the anomaly threshold of ``version`` (autoencoders)


#: Called for every update received: ``(update_id, reason)``, ``reason`` None when accepted,
#: :data:`fedmqtt.errors.HELD` when held for the next buffer (called again when it is accepted
#: or refused there), ``update_id`` None when the message was refused before its id could be
#: read.
UpdateObserver = Callable[[str | None, str | None], None]


class Engine:
    def __init__(self, cfg: AggregatorConfig, metrics: Metrics, keys: DeviceKeys | None) -> None:
        self.cfg = cfg
        self.on_update: UpdateObserver | None = None
        self.metrics = metrics
        self.keys = keys if keys is not None else DeviceKeys(cfg.security.devices_dir)
        self.federation = cfg.federation.id
        self.spec = cfg.spec
        self.layout = cfg.spec.layout()
        self.fingerprint = cfg.spec.fingerprint()
        self.limits = limits_for(self.layout, cfg.limits.max_update_bytes)
        self.params: F32 = self.layout.flatten(
            init_params(cfg.spec, np.random.default_rng(cfg.seed))
        )
        self.version = 0
        self.flushes = 0
        self.stats: dict[str, float] = {}
        self.version_created_at = time.time()
        self.strategy: Strategy = build_strategy(
            cfg.strategy, self.layout.size, scale_segments(self.layout)
        )
        if cfg.privacy.mode == "central":
            self.strategy.privacy = PrivacyState(cfg.privacy, cfg.strategy)
            metrics.set_privacy(self.strategy.privacy.status())
        self.window = ReplayWindow()
        lim = cfg.limits
        self.gate = NormGate(
            max_norm=lim.max_norm,
            reject_factor=lim.norm_reject_factor,
            window=lim.norm_window,
            min_samples=lim.norm_min_samples,
        )
        self.rate = DeviceRate(lim.device_rate, lim.device_burst)
        self.presence = Presence(self.federation, self.keys)
        self.cohort = cohort_gate(cfg)  # None: the plan lets every device train
        # Autoencoders: the devices' score-quantile reports and the threshold they give.
        self.thresholds = (
            ThresholdEstimator(quantile_level(cfg.spec), cfg.strategy.max_staleness)
            if cfg.spec.is_autoencoder
            else None
        )
        self.threshold: float | None = None
        self.reject_log = RejectionLog()
        self.telemetry = DeviceTelemetry(self.keys)
        self.evals = FederatedEval(
            self.federation,
            self.fingerprint,
            self.keys,
            metric_name(cfg.spec),
            reject_log=self.reject_log,
        )
        self._pool: ThreadPoolExecutor | None = None
        # Updates held for the next buffer, by sender (see the module docstring).
        self.deferred: dict[str, _Update | Verified] = {}
        self._defers = self.strategy.defers and self.cohort is None
        self.strategy.on_version(0, time.monotonic())

    # ------------------------------------------------------------------ state
    def restore(self, state: dict[str, Any]) -> None:
        """Resume from a checkpoint (``decode_state`` output); CheckpointError if unusable."""
        if state.get("federation") != self.federation:
            raise CheckpointError(
                f"the state directory belongs to federation {state.get('federation')!r}, "
                f"not {self.federation!r}"
            )
        if state.get("fingerprint") != self.fingerprint:
            raise CheckpointError(
                "the [model] in the config differs from the checkpointed model (spec "
                f"{state.get('fingerprint')!r} vs {self.fingerprint!r}); restore the old [model] "
                "or start a new state directory"
            )
        params = f32(state.get("params"), "params")
        if params.shape != (self.layout.size,) or not np.isfinite(params).all():
            raise CheckpointError("checkpointed parameters do not fit the model or are not finite")
        try:
            self.strategy.load_state(state["strategy"])
            self.window = ReplayWindow.from_state(state["replay"])
            self.gate.restore(state["norms"])
        except (KeyError, ValueError, TypeError) as e:
            raise CheckpointError(f"malformed checkpoint: {e}") from None
        self.params = params
        self.version = int(state["version"])
        self.flushes = int(state["flushes"])
        self.stats = {str(k): float(v) for k, v in dict(state.get("stats", {})).items()}
        self.version_created_at = float(state.get("version_created_at", time.time()))
        if self.thresholds is not None and "threshold" in state:
            try:
                self.thresholds.load_state(state["threshold"]["reports"])
                t = state["threshold"]["value"]
                self.threshold = None if t is None else float(t)
                if self.threshold is not None and not 0 <= self.threshold < math.inf:
                    raise ValueError(f"threshold {t!r} is not finite and >= 0")
            except (KeyError, ValueError, TypeError) as e:
                raise CheckpointError(f"malformed checkpoint: threshold: {e}") from None
        self.metrics.restore(state.get("metrics", {}))
        self.metrics.record_version(self.version, None, 0)
        if self.strategy.privacy is not None:
            self.metrics.set_privacy(self.strategy.privacy.status())
        self.strategy.on_version(self.version, time.monotonic())

    def snapshot(self) -> Snapshot:
        """Encode the durable state: everything except the buffered updates.

        The parameters array is never modified in place, so the snapshot can share it.
        """
        pending = self.strategy.pending
        window = self.window.to_state()
        if pending:
            buffered = self.strategy.pending_ids
            keep = [i for i, uid in enumerate(window["ids"]) if uid not in buffered]
            window = {k: [v[i] for i in keep] for k, v in window.items()}
        state = {
            "format": STATE_FORMAT,
            "federation": self.federation,
            "fingerprint": self.fingerprint,
            "spec": self.spec.to_wire(),
            "version": self.version,
            "flushes": self.flushes,
            "saved_at": time.time(),
            "version_created_at": self.version_created_at,
            "stats": self.stats,
            "params": tensor(self.params),
            "strategy": self.strategy.to_state(),
            "replay": window,
            "norms": self.gate.to_state(),
            "metrics": self.metrics.saved(unapplied_taus=[p.tau for p in pending]),
        }
        if self.thresholds is not None:
            state["threshold"] = {"value": self.threshold, "reports": self.thresholds.to_state()}
        return Snapshot(
            self.flushes,
            self.version,
            encode_state(state),
            self.params,
            dict(self.stats),
            self.version_created_at,
            self.threshold,
        )

    # ------------------------------------------------------------------ processing
    def process(self, items: Sequence[tuple[str, bytes]], now: float) -> list[int]:
        """Validate and apply raw messages (update or status topics), in order.

        Returns, per message, the flush that must be durable before it is acknowledged.
        """
        entries: list[_Entry] = []
        for (topic, payload), opened in zip(items, self._open_all(items), strict=True):
            if isinstance(opened, str):
                entries.append(_Presence(opened, payload))
            elif isinstance(opened, _Eval):
                entries.append(_Eval(opened.device, payload))
            elif isinstance(opened, RejectedError):
                entries.append(_Update({}, topic, len(payload), None, opened))
            else:
                entries.append(_Update(opened[1], topic, len(payload), opened[0], None))
        return self._apply(entries, now)

    def process_verified(self, items: Sequence[Verified], now: float) -> list[int]:
        """Apply updates already authenticated and decoded by a worker process (in order;
        returns what :meth:`process` returns)."""
        return self._apply(items, now)

    def _apply(self, entries: Sequence[_Entry | Verified], now: float) -> list[int]:
        """Steps 7-11 for every message, the one way an update reaches the buffer."""
        needs: list[int] = []
        taus: list[int] = []
        rejected: Counter[str] = Counter()
        received = nbytes = 0
        for e in entries:
            if isinstance(e, _Presence):
                self._status(e.device, e.payload)
                needs.append(0)
                continue
            if isinstance(e, _Eval):
                self._evaluation(e)
                needs.append(0)
                continue
            received += 1
            nbytes += e.nbytes
            needs.append(self._take(e, now, taus, rejected, held=False))
        self.metrics.record_batch(
            received=received, nbytes=nbytes, accepted_taus=taus, rejected=rejected
        )
        return needs

    def _take(
        self,
        e: _Update | Verified,
        now: float,
        taus: list[int],
        rejected: Counter[str],
        *,
        held: bool,
    ) -> int:
        """Check one update and commit, hold or refuse it; returns the flush it needs durable
        (``held``: it was held for this buffer, its rate already taken)."""
        meta = e.meta
        try:
            if isinstance(e, Verified):
                if e.reason is not None or meta is None:
                    raise RejectedError(e.reason or "schema", e.detail)
            elif e.refused is not None:
                raise e.refused
            assert meta is not None
            tau = check_staleness(meta.base_version, self.version, self.strategy.max_staleness)
            check_replay(meta.update_id, self.window)
            if self.cohort is not None:
                self.cohort.check(meta.sender, meta.base_version)
            if not held:
                self.rate.take(meta.sender, now)  # step 8a
            try:
                self.strategy.admit(meta.sender)  # step 8b
            except RejectedError as err:
                need = 0 if held or err.reason != DEVICE_QUOTA else self._hold(e, rejected)
                if need:
                    return need
                raise
            norm = self._fill(e)
        except RejectedError as err:
            self._refuse(e, err, rejected)
            return self._replay_needs(err) if err.reason == REPLAY else 0
        need = self.flushes + 1
        self.telemetry.accepted(meta.sender, tau, meta.base_version, time.time())
        taus.append(tau)
        self._commit(meta, tau, norm, now)
        return need

    def _refuse(self, e: _Update | Verified, err: RejectedError, rejected: Counter[str]) -> None:
        """Count, log and report the refusal of ``e``."""
        rejected[err.reason] += 1
        self.reject_log(self._device(e), err.reason, err.detail)
        self.telemetry.rejected(self._device(e), err.reason, time.time())
        self._observe(e.meta.update_id if e.meta is not None else None, err.reason)

    def _hold(self, e: _Update | Verified, rejected: Counter[str]) -> int:
        """Hold an update over its device's quota for the next buffer: the flush it needs
        (``flushes + 2``), or 0 if it may not be held (then it is refused as ``device_quota``).
        RejectedError (``superseded``) if the device's held update was made later; one made
        earlier is refused in its place."""
        meta = e.meta
        assert meta is not None
        if not self._defers or self.version + 1 - meta.base_version > self.strategy.max_staleness:
            return 0
        waiting = self.deferred.get(meta.sender)
        if waiting is not None:
            assert waiting.meta is not None
            if waiting.meta.update_id == meta.update_id:  # a redelivery waits with it
                return self.flushes + 2
            later = RejectedError(
                SUPERSEDED, f"a later update of {meta.sender!r} waits for the next buffer"
            )
            if waiting.meta.seq > meta.seq:
                raise later
            self._refuse(waiting, later, rejected)
        self.deferred[meta.sender] = e
        self.metrics.deferred += 1
        self.metrics.held = len(self.deferred)
        self._observe(meta.update_id, HELD)
        log.debug("update of %s held for the next buffer (max_per_device)", meta.sender)
        return self.flushes + 2

    def _release_held(self, now: float) -> None:
        """Right after a flush: the held updates into the buffer it emptied."""
        if not self.deferred:
            return
        held, self.deferred = list(self.deferred.values()), {}
        self.metrics.held = 0
        taus: list[int] = []
        rejected: Counter[str] = Counter()
        for e in held:
            self._take(e, now, taus, rejected, held=True)
        self.metrics.record_batch(received=0, nbytes=0, accepted_taus=taus, rejected=rejected)

    def _device(self, e: _Update | Verified) -> str:
        if isinstance(e, Verified):
            return e.device
        return topics.update_device(e.topic, self.federation) or "?"

    def _fill(self, e: _Update | Verified) -> float:
        """Steps 9-10: the delta into the strategy's next row, then the norm gate; returns the
        delta's norm. A worker's update carries the norm it computed: it is gated first and
        not computed a second time."""
        strategy = self.strategy
        if not isinstance(e, Verified):
            norm = decode_delta(
                e.delta, self.layout, self.limits, strategy.slot(), strategy.slot_scales()
            )
            self.gate.check(norm)
            return norm
        self.gate.check(e.norm)
        row = strategy.slot()
        scales = strategy.slot_scales()
        if scales is not None:  # the values themselves go in the row
            scales.fill(1.0)
        if e.encoded:
            delta = unpack_map(e.delta, max_bytes=self.cfg.limits.max_update_bytes)
            decode_params(delta, self.layout, limits=self.limits, out=row)
        else:
            src = np.frombuffer(e.delta, dtype=np.float32)
            if src.shape != row.shape:
                raise RejectedError("shape", "worker sent a delta of the wrong size")
            row[:] = src
        return e.norm

    def _open(self, topic: str, payload: bytes) -> _Opened:
        status_of = topics.status_device(topic, self.federation)
        if status_of is not None:
            return status_of
        eval_of = topics.eval_device(topic, self.federation)
        if eval_of is not None:
            return _Eval(eval_of)
        try:
            return open_update(
                topic,
                payload,
                federation=self.federation,
                fingerprint=self.fingerprint,
                keys=self.keys,
                max_bytes=self.cfg.limits.max_update_bytes,
            )
        except RejectedError as e:
            return e

    def _open_all(self, items: Sequence[tuple[str, bytes]]) -> list[_Opened]:
        """Steps 1-6 for every message; on several threads when the messages are large and
        their MACs or signatures slow.

        Checking an HMAC-SHA256 or Ed25519 signature of a large update is a large part of its
        cost, and hashlib and OpenSSL release the GIL while they hash, so contiguous slices of
        a batch are opened in parallel (order is kept). Small messages stay on this thread:
        there the work is Python bytecode, which threads cannot speed up. So do messages
        authenticated with ChaCha20-Poly1305 (the default), which is too fast for the hand-off
        to pay (:data:`CHEAP_AUTH_ALGS`).
        """
        n = len(items)
        threads = self.cfg.limits.verify_threads
        if threads <= 1 or n < 2:
            return [self._open(t, p) for t, p in items]
        floor = PARALLEL_MIN_MEAN_BYTES * n
        if sum(len(p) for _, p in items) < floor or self._slow_auth_bytes(items) < floor:
            return [self._open(t, p) for t, p in items]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="agg-verify")
        parts = min(threads, n)
        bounds = [n * i // parts for i in range(parts + 1)]

        def run(lo: int, hi: int) -> list[_Opened]:
            return [self._open(t, p) for t, p in items[lo:hi]]

        futures = [self._pool.submit(run, bounds[i], bounds[i + 1]) for i in range(1, parts)]
        out = run(bounds[0], bounds[1])
        for f in futures:
            out.extend(f.result())
        return out

    def _slow_auth_bytes(self, items: Sequence[tuple[str, bytes]]) -> int:
        """Bytes of the messages whose device authenticates with a MAC or signature not in
        :data:`CHEAP_AUTH_ALGS` (unknown devices count as cheap: they are refused early)."""
        slow = 0
        for topic, payload in items:
            device = topics.update_device(topic, self.federation)
            key = self.keys.get(device) if device is not None else None
            if key is not None and key.alg not in CHEAP_AUTH_ALGS:
                slow += len(payload)
        return slow

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    @property
    def timed(self) -> bool:
        """Whether the strategy aggregates on time alone (:meth:`tick` is then worth calling)."""
        return self.strategy.timed

    def tick(self, now: float) -> bool:
        """Time-based aggregation (a strategy's deadline); True if a version was made."""
        if len(self.strategy) and self.strategy.ready(now):
            return self._aggregate(now)
        return False

    def flush_partial(self, now: float) -> int:
        """Aggregate the buffer now, however few updates it holds (the acknowledgement window
        is nearly full, see ``Aggregator._relieve_window``); returns how many it held."""
        n = len(self.strategy)
        if n:
            self._aggregate(now)
        return n

    def rollback(
        self,
        params: F32,
        strategy_state: dict[str, Any] | None,
        to_version: int,
        now: float,
        *,
        manual: bool = False,
    ) -> int:
        """Make a new version whose parameters are ``params`` (those of ``to_version``), with
        that version's strategy state when given; returns the new version (its stats:
        ``rollback_to``, and ``rollback_manual`` for an operator's). The buffer is
        applied first, so every accepted update stays in a version (the rolled-back one) and
        its acknowledgement still waits for a durable flush; the replay window and the norm
        history are kept."""
        if params.shape != (self.layout.size,) or not np.isfinite(params).all():
            raise ValueError("rollback parameters do not fit the model or are not finite")
        while len(self.strategy):  # the held updates enter the emptied buffer: applied too
            self._aggregate(now)
        if strategy_state is not None:
            self.strategy.load_state(strategy_state)
        self.params = params
        self.version += 1
        self.flushes += 1
        self.stats = {"rollback_to": float(to_version)}
        if manual:
            self.stats["rollback_manual"] = 1.0
        self.version_created_at = time.time()
        self.strategy.on_version(self.version, now)
        self.window.prune(self.version - self.strategy.max_staleness)
        self.metrics.record_version(self.version, None, 0)
        return self.version

    def _replay_needs(self, e: RejectedError) -> int:
        """The flush that applies (or applied) the original of a replayed update."""
        uid = e.update_id if isinstance(e, ReplayError) else None
        return self.flushes + 1 if uid in self.strategy.pending_ids else self.flushes

    def _status(self, device: str, payload: bytes) -> None:
        try:
            self.presence.handle(device, payload)
        except RejectedError as e:
            self.metrics.status_rejected += 1
            self.reject_log(device, "status-" + e.reason, e.detail)
            return
        self.metrics.set_online(self.presence.online())
        self.telemetry.presence(device, self.presence.state_of(device), time.time())

    def _evaluation(self, e: _Eval) -> None:
        report = self.evals.handle(e.device, e.payload, self.version)
        if report is not None:
            self.telemetry.evaluated(report, time.time())

    def _observe(self, update_id: str | None, reason: str | None) -> None:
        if self.on_update is not None:
            self.on_update(update_id, reason)

    def _commit(self, meta: UpdateMeta, tau: int, norm: float, now: float) -> None:
        self.strategy.add(meta, tau, norm)
        if self.thresholds is not None and meta.score_quantiles is not None:
            self.thresholds.report(
                meta.sender, meta.score_quantiles, meta.num_samples, meta.base_version
            )
        self.window.add(meta.update_id, meta.base_version)
        self._observe(meta.update_id, None)
        self.gate.observe(norm)
        if self.strategy.ready(now) or (  # a draw smaller than the buffer
            self.cohort is not None and self.cohort.complete(self.version, self.strategy.per_device)
        ):
            self._aggregate(now)
        else:
            self.metrics.set_buffered(len(self.strategy))

    def _aggregate(self, now: float) -> bool:
        t0 = time.perf_counter()
        stats = self.strategy.stats()
        try:
            new = self.strategy.aggregate(self.params, self.gate.median())
        except ValueError as e:
            # The last line of defence (validation bounds every row, so this should not
            # happen): never let a non-finite model out. The buffer is dropped, not retried.
            log.error(
                "aggregation of %d buffered updates failed, dropping them: %s",
                len(self.strategy),
                e,
            )
            self.strategy.clear()
            self.flushes += 1
            self.metrics.set_buffered(0)
            self._release_held(now)
            return False
        self.strategy.clear()
        self.params = new
        self.version += 1
        self.flushes += 1
        self.stats = stats
        if self.thresholds is not None:
            t = self.thresholds.estimate(self.version)
            self.threshold = self.threshold if t is None else t
        self.version_created_at = time.time()
        self.strategy.on_version(self.version, now)
        self.window.prune(self.version - self.strategy.max_staleness)
        self.metrics.record_version(self.version, time.perf_counter() - t0, 0)
        if self.strategy.privacy is not None:
            self.metrics.set_privacy(self.strategy.privacy.status())
        self._release_held(now)
        return True
