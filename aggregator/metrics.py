"""Counters of what the aggregator received, accepted and refused, in three views.

* :meth:`Metrics.snapshot`: a plain dict (``Aggregator.snapshot()``, ``status.json``, the
  retained metrics message and the simulator all read it);
* a Prometheus registry of its own (not the process-global one, so several aggregators can run
  in one process, as the simulator and the tests do), served by :func:`serve_prometheus`;
* :meth:`Metrics.message`: the retained JSON (or msgpack) payload for ``fl/<fed>/metrics``.

The engine thread records one batch at a time (:meth:`Metrics.record_batch`), so the per-update
cost is a few integer additions. :class:`RejectionLog` logs each (device, reason) pair once at
WARNING, then at DEBUG, so a device stuck sending bad updates cannot flood the journal.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter as PyCounter
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final, cast

import msgpack
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from fedmqtt.errors import REASONS

log = logging.getLogger(__name__)

STALENESS_BUCKETS: Final = (0, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89)
LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)


class Metrics:
    def __init__(self, federation: str) -> None:
        self.federation = federation
        self._lock = threading.Lock()
        self.started = time.time()
        self.received = 0
        self.bytes_received = 0
        self.accepted = 0
        self.rejected: dict[str, int] = {}
        self.staleness: dict[int, int] = {}
        self.version = 0
        self.aggregations = 0
        self.last_aggregation_s: float | None = None
        self.buffered = 0
        self.devices_online = 0
        self.accuracy: float | None = None
        self.eval_version: int | None = None
        self.eval_metric = "accuracy"
        self.connected = False
        self.checkpoints = 0
        self.status_rejected = 0
        self.partial_flushes = 0  # buffers applied early because the ack window was nearly full
        self.deferred = 0  # updates over max_per_device held for the next buffer
        self.held = 0  # ... and still held now
        # More entries for snapshot(), computed by their owner (aggregator.fleet.attach).
        self.extra: Callable[[], dict[str, Any]] | None = None
        self.rollbacks: dict[str, int] = {}  # by kind: "manual" (operator), "gate" (automatic)
        self.released_version: int | None = None  # the newest version the gate released
        self.released_score: float | None = None
        self.privacy: dict[str, Any] | None = None  # central DP (aggregator.privacy), or None

        # Counters and gauges are plain attributes exported by a collector at scrape time, so
        # recording an update costs a few integer additions, not a locked Prometheus call.
        r = self.registry = CollectorRegistry(auto_describe=False)
        r.register(_Collector(self))
        self.p_agg = Histogram(
            "fedmqtt_aggregation_seconds",
            "Time to aggregate a buffer into a new version",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.p_ckpt = Histogram(
            "fedmqtt_checkpoint_seconds",
            "Time to write a checkpoint",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    # ------------------------------------------------------------------ recording
    def restore(self, saved: Mapping[str, Any]) -> None:
        """Continue the counters of a previous run (from the checkpoint)."""
        with self._lock:
            self.received = int(saved.get("received", 0))
            self.bytes_received = int(saved.get("bytes_received", 0))
            self.accepted = int(saved.get("accepted", 0))
            self.rejected = {str(k): int(v) for k, v in dict(saved.get("rejected", {})).items()}
            self.staleness = {int(k): int(v) for k, v in dict(saved.get("staleness", {})).items()}
            self.aggregations = int(saved.get("aggregations", 0))
            self.rollbacks = {str(k): int(v) for k, v in dict(saved.get("rollbacks", {})).items()}

    def saved(self, unapplied_taus: Iterable[int] = ()) -> dict[str, Any]:
        """The counters to persist in a checkpoint, without the accepted updates that are
        still buffered (``unapplied_taus``): the broker redelivers those after a crash, and they
        are counted again then."""
        with self._lock:
            staleness = dict(self.staleness)
            n = 0
            for tau in unapplied_taus:
                staleness[tau] -= 1
                n += 1
            return {
                "received": self.received,
                "bytes_received": self.bytes_received,
                "accepted": self.accepted - n,
                "rejected": dict(self.rejected),
                "staleness": {str(k): v for k, v in staleness.items() if v},
                "aggregations": self.aggregations,
                "rollbacks": dict(self.rollbacks),
            }

    def record_batch(
        self,
        *,
        received: int,
        nbytes: int,
        accepted_taus: Iterable[int],
        rejected: Mapping[str, int],
    ) -> None:
        taus = list(accepted_taus)
        with self._lock:
            self.received += received
            self.bytes_received += nbytes
            self.accepted += len(taus)
            for reason, n in rejected.items():
                self.rejected[reason] = self.rejected.get(reason, 0) + n
            for tau, n in PyCounter(taus).items():
                self.staleness[tau] = self.staleness.get(tau, 0) + n

    def record_version(self, version: int, seconds: float | None, buffered: int) -> None:
        with self._lock:
            if seconds is not None:
                self.aggregations += 1
                self.last_aggregation_s = seconds
            self.version = version
            self.buffered = buffered
        if seconds is not None:
            self.p_agg.observe(seconds)

    def set_buffered(self, n: int) -> None:
        self.buffered = n

    def record_checkpoint(self, seconds: float) -> None:
        self.checkpoints += 1
        self.p_ckpt.observe(seconds)

    def set_privacy(self, status: dict[str, Any]) -> None:
        with self._lock:
            self.privacy = dict(status)

    def set_online(self, n: int) -> None:
        self.devices_online = n

    def set_connected(self, up: bool) -> None:
        self.connected = up

    def set_evaluation(self, version: int, score: float, metric: str) -> None:
        with self._lock:
            self.accuracy, self.eval_version, self.eval_metric = score, version, metric

    def count_rollback(self, kind: str) -> None:
        with self._lock:
            self.rollbacks[kind] = self.rollbacks.get(kind, 0) + 1

    def set_released(self, version: int, score: float | None) -> None:
        with self._lock:
            self.released_version, self.released_score = version, score

    # ------------------------------------------------------------------ views
    def snapshot(self) -> dict[str, Any]:
        extra = self.extra() if self.extra is not None else {}
        with self._lock:
            return {
                **extra,
                "federation": self.federation,
                "version": self.version,
                "updates_received": self.received,
                "bytes_received": self.bytes_received,
                "accepted": self.accepted,
                "rejected": dict(sorted(self.rejected.items())),
                "rejected_total": sum(self.rejected.values()),
                "staleness_histogram": {str(k): v for k, v in sorted(self.staleness.items())},
                "aggregations": self.aggregations,
                "last_aggregation_s": self.last_aggregation_s,
                "buffered": self.buffered,
                "devices_online": self.devices_online,
                "accuracy": self.accuracy,
                "eval_metric": self.eval_metric,
                "eval_version": self.eval_version,
                "connected": self.connected,
                "checkpoints": self.checkpoints,
                "status_rejected": self.status_rejected,
                "partial_flushes": self.partial_flushes,
                "deferred": self.deferred,
                "held": self.held,
                "rollbacks": dict(sorted(self.rollbacks.items())),
                "released_version": self.released_version,
                "released_score": self.released_score,
                "privacy": None if self.privacy is None else dict(self.privacy),
                "uptime_s": round(time.time() - self.started, 3),
            }

    def message(self, fmt: str) -> bytes:
        body = {"v": 1, "type": "metrics", "at": time.time(), **self.snapshot()}
        if fmt == "msgpack":
            return cast(bytes, msgpack.packb(body, use_bin_type=True))
        return json.dumps(body, sort_keys=True).encode()


class _Collector(Collector):
    """Exports the attributes of :class:`Metrics` when Prometheus scrapes."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def collect(self) -> Iterable[Metric]:
        m = self.m
        with m._lock:
            received, nbytes, accepted = m.received, m.bytes_received, m.accepted
            rejected = dict(m.rejected)
            staleness = dict(m.staleness)
        yield CounterMetricFamily(
            "fedmqtt_updates_received", "Messages on the updates topic", received
        )
        yield CounterMetricFamily(
            "fedmqtt_update_bytes_received", "Bytes of update payloads", nbytes
        )
        yield CounterMetricFamily(
            "fedmqtt_updates_accepted", "Updates that passed validation", accepted
        )
        yield CounterMetricFamily(
            "fedmqtt_partial_flushes",
            "Buffers applied before K updates because the acknowledgement window was nearly full",
            m.partial_flushes,
        )
        yield CounterMetricFamily(
            "fedmqtt_updates_deferred",
            "Updates over max_per_device held for the next buffer instead of refused",
            m.deferred,
        )
        rb = CounterMetricFamily(
            "fedmqtt_rollbacks", "Rollbacks by kind (manual, gate)", labels=["kind"]
        )
        for kind in ("gate", "manual"):
            rb.add_metric([kind], m.rollbacks.get(kind, 0))
        yield rb
        rej = CounterMetricFamily(
            "fedmqtt_updates_rejected", "Refused updates by reason", labels=["reason"]
        )
        for reason in sorted(set(REASONS) | set(rejected)):
            rej.add_metric([reason], rejected.get(reason, 0))
        yield rej
        buckets = [
            (str(le), float(sum(n for tau, n in staleness.items() if tau <= le)))
            for le in STALENESS_BUCKETS
        ]
        buckets.append(("+Inf", float(sum(staleness.values()))))
        hist = HistogramMetricFamily(
            "fedmqtt_update_staleness", "Staleness (versions) of accepted updates"
        )
        hist.add_metric([], buckets, float(sum(t * n for t, n in staleness.items())))
        yield hist
        for name, doc, value in (
            ("fedmqtt_model_version", "Current global model version", m.version),
            ("fedmqtt_buffered_updates", "Accepted updates not yet aggregated", m.buffered),
            ("fedmqtt_held_updates", "Updates held for the next buffer", m.held),
            ("fedmqtt_devices_online", "Devices whose presence is online", m.devices_online),
            ("fedmqtt_broker_connected", "1 while connected to the broker", int(m.connected)),
        ):
            yield GaugeMetricFamily(name, doc, value)
        privacy = m.privacy
        if privacy is not None:
            yield GaugeMetricFamily(
                "fedmqtt_privacy_epsilon",
                "Epsilon at [privacy] delta of the worst-case device (RDP accountant, central DP)",
                privacy["epsilon"],
            )
            yield GaugeMetricFamily(
                "fedmqtt_privacy_devices_exhausted",
                "Devices whose privacy budget is spent (their updates are refused)",
                privacy["devices_exhausted"],
            )
            yield GaugeMetricFamily(
                "fedmqtt_privacy_stopped",
                "1 once training stopped because the privacy budget is spent (on_budget = stop)",
                int(privacy["stopped"]),
            )
            yield CounterMetricFamily(
                "fedmqtt_privacy_releases", "Noised aggregates released", privacy["releases"]
            )
        if m.accuracy is not None:
            yield GaugeMetricFamily(
                "fedmqtt_eval_score",
                "Holdout accuracy (classifiers) or R^2 (linear) of the last evaluated version",
                m.accuracy,
            )


class RejectionLog:
    """Log a refusal once per (device, reason) at WARNING, later ones at DEBUG."""

    def __init__(self, max_pairs: int = 100_000) -> None:
        self._seen: set[tuple[str, str]] = set()
        self._max = max_pairs

    def __call__(self, device: str, reason: str, detail: str) -> None:
        key = (device, reason)
        if key in self._seen:
            log.debug("refused update from %s (%s): %s", device, reason, detail)
            return
        if len(self._seen) >= self._max:
            self._seen.clear()
        self._seen.add(key)
        log.warning(
            "refused update from %s (%s): %s; further refusals of this device for "
            "this reason are logged at DEBUG",
            device,
            reason,
            detail,
        )


def serve_prometheus(metrics: Metrics, port: int, bind: str) -> Any:
    """Serve ``/metrics`` in a daemon thread; returns the server (``shutdown()`` to stop)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=bind, registry=metrics.registry)
    return server
