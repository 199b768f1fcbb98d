"""One round of local training, split into a pure part and a committing part.

:func:`compute_delta` trains from the verified global model and returns ``new - base``; it
touches no state, so the agent can run it in a worker thread and simply abandon it when asked
to stop (SIGTERM must stop the device within 10 s, whatever the round costs).
:func:`build_update` then encodes the delta with the codec (top-k carrying its error-feedback
residual), and signs a :class:`fedmqtt.wire.Update` with a fresh random ``update_id`` and the
device's next ``seq``. Persisting (outbox, residual, counters) is the agent's job.

Hyperparameters come from the aggregator's plan; a value set in ``[training]`` overrides the
plan on this device (a slow device may want fewer epochs, a metered link another codec), and
with no plan at all the defaults of :class:`fedmqtt.wire.Plan` apply. The plan's ``extra`` may
carry ``weight_decay``, ``max_grad_norm`` and ``dp_clip`` (central differential privacy: the
delta is clipped to that L2 norm before it is encoded; docs/privacy.md).

For an autoencoder, the round also measures quantiles of the anomaly scores of the local data
under the global model it starts from (before training, so the report describes that version)
and the update carries them in ``metrics`` (``wire.SCORE_QUANTILE_PREFIX``); the scores
themselves stay here.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from edge_agent.config import TrainingConfig
from fedmqtt import wire
from fedmqtt.codecs import Codec, ErrorFeedback, encode_params
from fedmqtt.errors import ConfigError
from fedmqtt.models.anomaly import (
    anomaly_scores,
    quantile_level,
    report_levels,
    score_quantiles,
)
from fedmqtt.models.train import TrainConfig, TrainStats, train_local
from fedmqtt.params import Params
from fedmqtt.privacy.clip import clip_params
from fedmqtt.privacy.config import PLAN_CLIP_KEY
from fedmqtt.rand import RandomSource
from fedmqtt.signing import Signer

log = logging.getLogger(__name__)

DeltaTransform = Callable[[Params], Params]
DataTransform = Callable[
    [npt.NDArray[np.float32], npt.NDArray[np.generic]],
    tuple[npt.NDArray[np.float32], npt.NDArray[np.generic]],
]


@dataclass(frozen=True)
class Hyper:
    """The resolved settings of one round."""

    train: TrainConfig
    codec: Codec
    clip: float | None = None  # L2 bound of the delta asked by the plan (central DP)

    @property
    def uses_feedback(self) -> bool:
        """Error feedback for the codecs that leave much out: top-k (what it does not send)
        and int4 (15 levels: its rounding error, carried into the next round, makes fewer
        updates reach a target; docs/benchmarks.md). int8 and finer send almost everything."""
        return self.codec.name in ("topk", "int4")

    @property
    def persists_feedback(self) -> bool:
        """Whether the residual is kept in the state directory: only top-k's, which holds
        whole coordinates not yet sent. int4's is below one quantization step per value, so
        it stays in memory (a restart drops it) rather than cost a full-model file write per
        round on an SD card."""
        return self.codec.name == "topk"


def resolve_hyper(plan: wire.Plan | None, cfg: TrainingConfig) -> Hyper:
    """Plan values, overridden by the ones set locally; raises ConfigError if unusable."""
    p = plan if plan is not None else wire.Plan(federation="", sender="", revision=0)
    extra = p.extra
    wd = float(extra.get("weight_decay", 0.0))
    mgn = extra.get("max_grad_norm")
    clip = extra.get(PLAN_CLIP_KEY)
    codec_text = cfg.codec if cfg.codec is not None else p.codec
    try:
        codec = Codec.parse(codec_text)
    except ConfigError as e:
        if cfg.codec is not None:
            raise
        log.warning("plan codec %r is not usable here (%s); sending raw", codec_text, e)
        codec = Codec("raw")
    try:
        train = TrainConfig(
            epochs=cfg.epochs if cfg.epochs is not None else p.epochs,
            lr=cfg.lr if cfg.lr is not None else p.lr,
            batch_size=cfg.batch_size if cfg.batch_size is not None else p.batch_size,
            momentum=cfg.momentum if cfg.momentum is not None else p.momentum,
            mu=cfg.mu if cfg.mu is not None else p.mu,
            weight_decay=wd if math.isfinite(wd) and wd >= 0 else 0.0,
            max_grad_norm=float(mgn) if mgn is not None and mgn > 0 else None,
        )
    except ValueError as e:
        raise ConfigError(f"plan revision {p.revision} is not usable: {e}") from None
    bound = float(clip) if clip is not None and math.isfinite(clip) and clip > 0 else None
    return Hyper(train=train, codec=codec, clip=bound)


@dataclass(frozen=True)
class DeltaResult:
    delta: Params
    stats: TrainStats
    seconds: float
    trained: Params | None = None  # the trained parameters, if asked for (keep_trained)
    # Autoencoders: (level, score quantile) pairs, see the module docstring.
    score_quantiles: tuple[tuple[float, float], ...] | None = None


def compute_delta(
    model: wire.GlobalModel,
    X: npt.NDArray[np.float32],
    y: npt.NDArray[np.generic],
    hyper: Hyper,
    rng: RandomSource,
    *,
    delta_transform: DeltaTransform | None = None,
    keep_trained: bool = False,
) -> DeltaResult:
    """Train from ``model`` and return ``new - base`` per tensor (float32), with the trained
    parameters themselves (before ``delta_transform``) if ``keep_trained``. No side effects."""
    t0 = time.thread_time()  # this thread only: agents may share a process
    quantiles = None
    if model.spec.is_autoencoder:
        scores = anomaly_scores(model.spec, model.params, X)
        levels = report_levels(quantile_level(model.spec))
        quantiles = tuple(zip(levels, score_quantiles(scores, levels), strict=True))
    new, stats = train_local(model.spec, model.params, X, y, hyper.train, rng)
    delta: Params = {
        k: np.subtract(new[k], model.params[k], dtype=np.float32) for k in model.params
    }
    if delta_transform is not None:
        delta = delta_transform(delta)
    if hyper.clip is not None:
        delta, _ = clip_params(delta, hyper.clip)
    seconds = time.thread_time() - t0
    return DeltaResult(
        delta,
        stats,
        seconds,
        trained=new if keep_trained else None,
        score_quantiles=quantiles,
    )


def new_update_id() -> str:
    """128 random bits: unguessable and, for all practical purposes, never repeated."""
    return secrets.token_hex(16)


def build_update(
    model: wire.GlobalModel,
    result: DeltaResult,
    hyper: Hyper,
    *,
    device_id: str,
    federation: str,
    seq: int,
    signer: Signer,
    rng: RandomSource,
    feedback: ErrorFeedback | None,
    compact: bool = True,
) -> tuple[wire.Update, bytes]:
    """Encode (updating ``feedback`` in place) and sign, in the compact wire form unless
    ``compact`` is False; returns the update and its payload."""
    encoded = encode_params(result.delta, hyper.codec, rng=rng, feedback=feedback)
    metrics = {
        "loss": float(result.stats.loss),
        "steps": float(result.stats.steps),
        "train_cpu_s": round(result.seconds, 6),
    }
    for level, value in result.score_quantiles or ():
        metrics[wire.score_quantile_key(level)] = value
    update = wire.Update(
        federation=federation,
        sender=device_id,
        update_id=new_update_id(),
        seq=seq,
        base_version=model.version,
        num_samples=result.stats.num_samples,
        spec_fingerprint=model.spec.fingerprint(),
        delta=encoded,
        metrics=metrics,
    )
    return update, wire.encode(update, signer, compact=compact)
