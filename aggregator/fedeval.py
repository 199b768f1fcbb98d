"""Federated evaluation on the aggregator: devices' reports checked, kept per version, combined.

A device evaluates every new global version on its validation split and publishes an
:class:`fedmqtt.fedeval.EvalReport` on ``fl/<fed>/eval/<device>``. A report is validated like
an update, cheapest check first, and a refused one changes nothing and is counted by reason
(and logged once per device and reason):

1. ``size``: above :data:`fedmqtt.fedeval.MAX_REPORT_BYTES`;
2. ``schema``: not a fedmqtt envelope;
3. ``unknown_device`` / ``signature``: no enrolled key for the topic's device, or the MAC /
   signature does not verify with it (the device's update key: nobody else can report for it);
4. ``schema``: not a valid report (a missing field, a NaN or infinite loss or metric, ...);
   ``federation`` / ``sender_mismatch``: for another federation, or the body's sender is not
   the topic's device;
5. ``spec``: evaluated another model;
6. ``future``: a version newer than the newest the aggregator has made (never published);
   ``stale``: older than the last :data:`KEEP_VERSIONS` versions that have reports;
7. ``replay``: the device already reported this version (the first report stands).

Accepted reports are kept per version for the newest :data:`KEEP_VERSIONS` versions that have
reports, and combined by :func:`fedmqtt.fedeval.summarize`; :meth:`FederatedEval.federated_eval`
answers for any of them, and for the summaries of older versions, of which the last
:data:`KEEP_SUMMARIES` are kept.

Thread safety: the engine thread calls :meth:`FederatedEval.handle`; any thread may read.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Final

from aggregator.devices import DeviceKeys
from fedmqtt import wire
from fedmqtt.errors import (
    FEDERATION,
    FUTURE,
    REPLAY,
    SENDER_MISMATCH,
    SIZE,
    SPEC,
    STALE,
    UNKNOWN_DEVICE,
    RejectedError,
)
from fedmqtt.fedeval import (
    MAX_REPORT_BYTES,
    DeviceEval,
    EvalReport,
    EvalSummary,
    decode_report,
    summarize,
)

log = logging.getLogger(__name__)

KEEP_VERSIONS: Final = 8  # versions whose individual reports are kept (and still accepted)
KEEP_SUMMARIES: Final = 256  # summaries of older versions kept for status and history

#: Called with ``(device, reason, detail)`` for every refused report (a rejection log).
RejectLog = Callable[[str, str, str], None]


class FederatedEval:
    def __init__(
        self,
        federation: str,
        fingerprint: str,
        keys: DeviceKeys,
        metric_name: str,
        *,
        reject_log: RejectLog | None = None,
    ) -> None:
        self.federation = federation
        self.fingerprint = fingerprint
        self.keys = keys
        self.metric_name = metric_name
        self._reject_log = reject_log
        self._lock = threading.Lock()
        self._reports: dict[int, dict[str, DeviceEval]] = {}
        self._summaries: dict[int, EvalSummary | None] = {}  # cache, and the older versions'
        self.received = 0
        self.accepted = 0
        self.bytes_received = 0
        self.rejected: dict[str, int] = {}
        self.changed = False  # since the last to_state()

    # ------------------------------------------------------------------ receiving
    def handle(self, device: str, payload: bytes, version: int) -> EvalReport | None:
        """Check and keep one report of ``device`` (the topic's), the newest version made being
        ``version``; returns the report, or None if refused (counted and logged)."""
        try:
            report = self._open(device, payload, version)
        except RejectedError as e:
            with self._lock:
                self.changed = True
                self.received += 1
                self.bytes_received += len(payload)
                self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
            if self._reject_log is not None:
                self._reject_log(device, "eval-" + e.reason, e.detail)
            return None
        with self._lock:
            self.changed = True
            self.received += 1
            self.bytes_received += len(payload)
            self.accepted += 1
            self._reports.setdefault(report.version, {})[device] = DeviceEval(
                report.num_samples, report.loss, dict(report.metrics)
            )
            self._summaries.pop(report.version, None)
            self._prune()
        return report

    def _open(self, device: str, payload: bytes, version: int) -> EvalReport:
        if len(payload) > MAX_REPORT_BYTES:
            raise RejectedError(SIZE, f"report of {len(payload)} bytes exceeds {MAX_REPORT_BYTES}")
        env = wire.open_envelope(payload, max_bytes=MAX_REPORT_BYTES)
        verifier = self.keys.get(device)
        if verifier is None:
            raise RejectedError(UNKNOWN_DEVICE, f"no enrolled key for device {device!r}")
        env.verify(verifier)
        r = decode_report(env)
        if r.federation != self.federation:
            raise RejectedError(FEDERATION, f"report for federation {r.federation[:64]!r}")
        if r.sender != device:
            raise RejectedError(
                SENDER_MISMATCH, f"body says sender {r.sender[:64]!r}, topic says {device!r}"
            )
        if r.spec_fingerprint != self.fingerprint:
            raise RejectedError(SPEC, f"evaluated model {r.spec_fingerprint[:32]!r}")
        if r.version > version:
            raise RejectedError(FUTURE, f"version {r.version} is newer than {version}")
        with self._lock:
            kept = sorted(self._reports)
            oldest = kept[-KEEP_VERSIONS] if len(kept) >= KEEP_VERSIONS else -1
            archived = r.version in self._summaries and r.version not in self._reports
            if r.version < oldest or archived:
                raise RejectedError(STALE, f"version {r.version} is no longer evaluated")
            if device in self._reports.get(r.version, {}):
                raise RejectedError(REPLAY, f"device already reported version {r.version}")
        return r

    def _prune(self) -> None:
        while len(self._reports) > KEEP_VERSIONS:
            oldest = min(self._reports)
            self._summaries[oldest] = self._summary_locked(oldest)
            del self._reports[oldest]
        while len(self._summaries) > KEEP_SUMMARIES:
            del self._summaries[min(self._summaries)]

    # ------------------------------------------------------------------ queries
    def federated_eval(self, version: int) -> EvalSummary | None:
        """The federated evaluation of ``version``: sample-weighted metric and loss, devices,
        p10/p90 across devices; None if no device has reported on it (or it is forgotten)."""
        with self._lock:
            return self._summary_locked(version)

    def _summary_locked(self, version: int) -> EvalSummary | None:
        if version in self._summaries:
            return self._summaries[version]
        reports = self._reports.get(version)
        if reports is None:
            return None
        s = summarize(version, self.metric_name, list(reports.values()))
        self._summaries[version] = s
        return s

    def latest(self) -> EvalSummary | None:
        """The summary of the newest version any device has reported on."""
        with self._lock:
            versions = set(self._reports) | {v for v, s in self._summaries.items() if s}
            return self._summary_locked(max(versions)) if versions else None

    def history(self, n: int = 16) -> list[EvalSummary]:
        """The summaries of the newest ``n`` versions that have one, oldest first."""
        with self._lock:
            versions = sorted(set(self._reports) | set(self._summaries))[-n:]
            out = [self._summary_locked(v) for v in versions]
        return [s for s in out if s is not None]

    def counters(self) -> dict[str, Any]:
        with self._lock:
            return {
                "received": self.received,
                "accepted": self.accepted,
                "bytes_received": self.bytes_received,
                "rejected": dict(sorted(self.rejected.items())),
            }

    # ------------------------------------------------------------------ persistence
    def to_state(self) -> dict[str, Any]:
        with self._lock:
            self.changed = False
            return {
                "reports": {
                    str(v): {d: [e.num_samples, e.loss, e.metrics] for d, e in sorted(r.items())}
                    for v, r in sorted(self._reports.items())
                },
                "summaries": {str(v): s.to_dict() for v, s in sorted(self._summaries.items()) if s},
                "received": self.received,
                "accepted": self.accepted,
                "bytes_received": self.bytes_received,
                "rejected": dict(self.rejected),
            }

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`to_state` output (ValueError / TypeError / KeyError if bad)."""
        reports: dict[int, dict[str, DeviceEval]] = {}
        for v, devs in dict(state.get("reports", {})).items():
            reports[int(v)] = {
                str(d): DeviceEval(int(n), float(loss), {str(k): float(x) for k, x in m.items()})
                for d, (n, loss, m) in dict(devs).items()
            }
        summaries: dict[int, EvalSummary | None] = {}
        for v, s in dict(state.get("summaries", {})).items():
            if int(v) not in reports:
                summaries[int(v)] = EvalSummary.from_dict(dict(s))
        with self._lock:
            self._reports, self._summaries = reports, summaries
            self.received = int(state.get("received", 0))
            self.accepted = int(state.get("accepted", 0))
            self.bytes_received = int(state.get("bytes_received", 0))
            self.rejected = {str(k): int(n) for k, n in dict(state.get("rejected", {})).items()}
            self._prune()
