"""The service's view of its fleet: federated evaluation and per-device telemetry, exported.

Glue between the engine's :class:`aggregator.fedeval.FederatedEval` and
:class:`aggregator.telemetry.DeviceTelemetry` and the service's outputs:

* :func:`fleet_summary`: the ``federated_eval`` / ``eval_reports`` entries of
  :meth:`aggregator.metrics.Metrics.snapshot` (hence ``status.json``, the retained metrics
  message and the simulator's series);
* :class:`FleetCollector`: Prometheus series. Fleet-level only by default (bounded
  cardinality): the federated evaluation of the newest reported version (mean, p10, p90 of the
  headline metric, loss, reporting devices), and evaluation reports received, accepted and
  refused by reason. With ``[metrics] per_device = true`` also one series per device and
  figure (``device`` label): its cardinality grows with the fleet;
* :func:`restore_fleet` / :func:`save_fleet_state`: the ``fleet.json`` file
  (:mod:`aggregator.telemetry`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from aggregator.telemetry import load_fleet, save_fleet
from fedmqtt.errors import REASONS

if TYPE_CHECKING:
    from aggregator.engine import Engine
    from aggregator.metrics import Metrics

log = logging.getLogger(__name__)

STATUS_DEVICES: Final = 500  # devices listed in status.json (the most recently seen ones)


def attach(metrics: Metrics, engine: Engine, *, per_device: bool) -> None:
    """Export ``engine``'s fleet figures through ``metrics`` (snapshot and Prometheus)."""
    metrics.extra = lambda: fleet_summary(engine)
    metrics.registry.register(FleetCollector(engine, per_device=per_device))


def fleet_summary(engine: Engine) -> dict[str, Any]:
    """``federated_eval``: the newest version's summary (None before any report) and
    ``eval_reports``: counters of received / accepted / refused reports."""
    latest = engine.evals.latest()
    return {
        "federated_eval": latest.to_dict() if latest is not None else None,
        "eval_reports": engine.evals.counters(),
        "devices_known": engine.telemetry.count(),
    }


def device_status(engine: Engine) -> dict[str, Any]:
    """The per-device entries of ``status.json``."""
    return {"devices": engine.telemetry.listing(limit=STATUS_DEVICES)}


def save_fleet_state(state_dir: Path, engine: Engine) -> None:
    save_fleet(state_dir, engine.telemetry.to_state(), engine.evals.to_state())


def restore_fleet(state_dir: Path, engine: Engine) -> bool:
    """Continue the telemetry and federated evaluation of ``<state_dir>/fleet.json``; False if
    there is none (or it is unusable: logged, and started afresh)."""
    doc = load_fleet(state_dir)
    if doc is None:
        return False
    try:
        engine.telemetry.restore(dict(doc.get("devices", {})))
        engine.evals.restore(dict(doc.get("evaluation", {})))
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        log.warning("ignoring the malformed fleet file in %s: %s", state_dir, e)
        return False
    return True


class FleetCollector(Collector):
    def __init__(self, engine: Engine, *, per_device: bool) -> None:
        self.engine = engine
        self.per_device = per_device

    def collect(self) -> Iterable[Metric]:
        evals = self.engine.evals
        c = evals.counters()
        yield CounterMetricFamily(
            "fedmqtt_eval_reports_received", "Messages on the eval topics", c["received"]
        )
        yield CounterMetricFamily(
            "fedmqtt_eval_reports_accepted", "Evaluation reports accepted", c["accepted"]
        )
        rej = CounterMetricFamily(
            "fedmqtt_eval_reports_rejected", "Refused evaluation reports", labels=["reason"]
        )
        for reason in sorted(set(REASONS) | set(c["rejected"])):
            rej.add_metric([reason], c["rejected"].get(reason, 0))
        yield rej
        latest = evals.latest()
        if latest is not None:
            score = GaugeMetricFamily(
                "fedmqtt_federated_eval_score",
                "Federated evaluation of the newest reported version: sample-weighted mean and "
                "10th/90th percentile across devices of accuracy (classifiers) or R^2 (linear)",
                labels=["stat"],
            )
            for stat, value in (("mean", latest.metric), ("p10", latest.p10), ("p90", latest.p90)):
                score.add_metric([stat], value)
            yield score
            for name, doc, value in (
                ("fedmqtt_federated_eval_loss", "Sample-weighted mean loss", latest.loss),
                ("fedmqtt_federated_eval_devices", "Devices that reported", latest.devices),
                ("fedmqtt_federated_eval_version", "Version of these figures", latest.version),
            ):
                yield GaugeMetricFamily(name, doc, value)
        if self.per_device:
            yield from self._per_device()

    def _per_device(self) -> Iterable[Metric]:
        listing = self.engine.telemetry.listing()
        label = ["device"]
        accepted = CounterMetricFamily(
            "fedmqtt_device_updates_accepted", "Accepted updates per device", labels=label
        )
        rejected = CounterMetricFamily(
            "fedmqtt_device_updates_rejected", "Refused updates per device", labels=label
        )
        online = GaugeMetricFamily(
            "fedmqtt_device_online", "1 while the device is online", labels=label
        )
        seen = GaugeMetricFamily(
            "fedmqtt_device_last_seen_timestamp_seconds",
            "When the device was last heard from",
            labels=label,
        )
        score = GaugeMetricFamily(
            "fedmqtt_device_eval_score",
            "The device's last reported accuracy (classifiers) or R^2 (linear)",
            labels=label,
        )
        name = self.engine.evals.metric_name
        for device, d in listing.items():
            accepted.add_metric([device], d["accepted"])
            rejected.add_metric([device], sum(d["rejected"].values()))
            online.add_metric([device], 1.0 if d["online"] else 0.0)
            if d["last_seen"] is not None:
                seen.add_metric([device], d["last_seen"])
            last = d["last_eval"]
            if last is not None and name in last:
                score.add_metric([device], last[name])
        yield from (accepted, rejected, online, seen, score)
