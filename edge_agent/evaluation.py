"""The device's side of federated evaluation: split, evaluate, sign the report.

With ``[evaluation] fraction = f`` the validation split is the samples of ``[data]`` whose
keyed hash falls below ``f`` (:func:`fedmqtt.fedeval.validation_mask`): they are removed from
every round's training data and evaluated on. With ``[evaluation.data]`` the split is that
separate source, and ``[data]`` is trained on in full.

Every new verified global version is evaluated once, before the device trains on it, and also
when it does not train on it (throttled by its interval, or not selected): the report (loss,
metrics, sample count, agent version) is signed with the device's update key and published on
``fl/<fed>/eval/<device>``. The last evaluated version is kept in ``agent.json``, so a restart
does not report a version twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

import fedmqtt
from edge_agent.config import EvaluationConfig
from edge_agent.data import DataError, load_data
from edge_agent.trainer import DataTransform
from fedmqtt import wire
from fedmqtt.fedeval import EvalReport, evaluate_params, validation_mask
from fedmqtt.signing import Signer

log = logging.getLogger(__name__)

Arrays = tuple[npt.NDArray[np.float32], npt.NDArray[Any]]


@dataclass
class Evaluator:
    cfg: EvaluationConfig
    device_id: str
    federation: str
    signer: Signer
    evaluated: int = -1  # the last version evaluated (agent.json)
    compact: bool = False  # reports in the compact wire form (the aggregator's, fedmqtt.wire)
    reports: int = 0  # reports made during this run

    def due(self, model: wire.GlobalModel | None) -> bool:
        return self.cfg.enabled and model is not None and model.version > self.evaluated

    def split(self, X: npt.NDArray[np.float32], y: npt.NDArray[Any]) -> tuple[Arrays, Arrays]:
        """``(training part, validation part)`` of the loaded ``[data]``; with a separate
        source the validation part is empty (it is loaded by :meth:`report`)."""
        if self.cfg.fraction <= 0.0:
            return (X, y), (X[:0], y[:0])
        mask = validation_mask(X, y, self.cfg.fraction)
        return (X[~mask], y[~mask]), (X[mask], y[mask])

    def report(
        self,
        model: wire.GlobalModel,
        val: Arrays | None,
        transform: DataTransform | None = None,
    ) -> bytes | None:
        """Evaluate ``model`` on the validation split and return the signed report, or None if
        there is nothing to evaluate on (logged). ``val``: the split of already loaded data, or
        None to load it here (``transform``: the simulator's data hook, as for training).
        The version counts as evaluated either way: a failure is not retried."""
        self.evaluated = model.version
        try:
            if self.cfg.data is not None:
                X, y = load_data(self.cfg.data)
                if transform is not None:
                    X, y = transform(X, y)
            elif val is not None:
                X, y = val
            else:
                raise DataError("the validation split is part of [data]: load it first")
            if X.shape[0] == 0:
                raise DataError("the validation split is empty")
            ev = evaluate_params(model.spec, model.params, X, y)
        except (DataError, ValueError) as e:
            log.warning("%s: v%d not evaluated: %s", self.device_id, model.version, e)
            return None
        msg = EvalReport(
            federation=self.federation,
            sender=self.device_id,
            version=model.version,
            spec_fingerprint=model.spec.fingerprint(),
            num_samples=ev.num_samples,
            loss=ev.loss,
            metrics=ev.metrics,
            agent=fedmqtt.__version__,
        )
        self.reports += 1
        log.info(
            "%s: v%d evaluated on %d samples: loss %.4f, %s",
            self.device_id,
            model.version,
            ev.num_samples,
            ev.loss,
            ", ".join(f"{k} {v:.4f}" for k, v in ev.metrics.items()),
        )
        return msg.encode(self.signer, compact=self.compact)

    def load_and_report(
        self, model: wire.GlobalModel, data: Any, transform: DataTransform | None
    ) -> bytes | None:
        """:meth:`report` for a version the device does not train on now: loads ``[data]``
        (``data``, a DataConfig) for the fraction split."""
        if self.cfg.data is not None:
            return self.report(model, None, transform)
        try:
            X, y = load_data(data)
            if transform is not None:
                X, y = transform(X, y)
        except DataError as e:
            self.evaluated = model.version
            log.warning("%s: v%d not evaluated: %s", self.device_id, model.version, e)
            return None
        return self.report(model, self.split(X, y)[1])
