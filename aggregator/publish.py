"""The signed messages the aggregator publishes: model, announcement, spec, plan, ONNX.

All are retained at QoS 1 and signed with the aggregator's Ed25519 key, which every device
pins: a device that wakes up gets the current announcement, spec and plan at once and can check
they come from us. Devices do not subscribe to the model: each version is published (retained)
first and announced after, and a device fetches the retained model when it is ready to train
(docs/agent.md, Downlink). The spec is published before any model naming its fingerprint.

The plan carries a *revision* that devices use to ignore an older plan; it is bumped whenever
``[plan]`` changes between runs (``plan.json`` in the state directory remembers the last
revision and a digest of the plan it described).

The model's parameters are compressed with the ``[downlink]`` codec (:func:`downlink_params`);
what devices decode is the model the aggregator evaluates and the base of their updates.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from aggregator.config import AggregatorConfig, PlanConfig
from aggregator.engine import Snapshot
from fedmqtt import downlink, wire
from fedmqtt.codecs import Codec
from fedmqtt.fsutil import atomic_write_bytes
from fedmqtt.models.spec import ModelSpec
from fedmqtt.params import F32
from fedmqtt.privacy.config import PLAN_CLIP_KEY, PrivacyConfig
from fedmqtt.signing import Signer

log = logging.getLogger(__name__)

PLAN_FILE = "plan.json"
SENDER = "aggregator"


def downlink_params(cfg: AggregatorConfig, snap: Snapshot) -> tuple[dict[str, Any], F32]:
    """The parameters of version ``snap`` as published (wire maps in the ``[downlink]`` codec)
    and, flat, exactly what every device decodes from them: the model devices train on.

    Deterministic: the int8 codec's stochastic rounding draws from a generator seeded with
    the model seed and the version, so a version republished after a restart is the same
    bytes, and a device that kept it still holds the model the aggregator sends. The
    aggregator's own parameters stay float32; each version is quantized afresh from them, so
    the quantization error of one version is kept in the model the next is quantized from
    (server-side error feedback) and the published stream does not drift.
    """
    codec = Codec.parse(cfg.downlink.codec)
    return downlink.encode_model(
        cfg.spec.layout(), snap.params, codec, seed=cfg.seed, version=snap.version
    )


def model_message(
    cfg: AggregatorConfig, snap: Snapshot, *, keyframe: bool = False
) -> tuple[wire.GlobalModel, F32]:
    """The model message of ``snap`` and the parameters devices decode from it."""
    encoded, flat = downlink_params(cfg, snap)
    msg = wire.GlobalModel(
        federation=cfg.federation.id,
        sender=SENDER,
        version=snap.version,
        spec=cfg.spec,
        params=cfg.spec.layout().unflatten(flat, copy=False),
        stats=snap.stats,
        created_at=snap.created_at,
        encoded=encoded,
        keyframe=keyframe,
        threshold=snap.threshold,
    )
    return msg, flat


def sealed(cfg: AggregatorConfig, msg: wire.Message, signer: Signer) -> bytes:
    """``msg`` signed, in the wire form ``[downlink] compact`` chooses: every message the
    aggregator publishes goes through here."""
    return wire.encode(msg, signer, compact=cfg.downlink.compact)


def model_payload(cfg: AggregatorConfig, signer: Signer, snap: Snapshot) -> bytes:
    return sealed(cfg, model_message(cfg, snap)[0], signer)


def announce_payload(cfg: AggregatorConfig, signer: Signer, snap: Snapshot) -> bytes:
    """The announcement of a published version: devices fetch the model when ready."""
    msg = wire.Announce(
        cfg.federation.id, SENDER, snap.version, wire.UNSTATED_SPEC, snap.created_at
    )
    return sealed(cfg, msg, signer)


def genesis_of(cfg: AggregatorConfig, v0: F32 | None) -> wire.Genesis | None:
    """How a device builds version 0 itself (fedmqtt.downlink.genesis), given ``v0``, version
    0 as devices decode it (None: not held any more); None unless the build gives exactly
    ``v0`` here (a state initialised with another seed, for instance)."""
    if v0 is None:
        return None
    codec = cfg.downlink.codec
    want = downlink.digest(v0)
    if downlink.digest(downlink.genesis(cfg.spec, cfg.seed, codec)) != want:
        log.warning("version 0 is not the model seed's initial model; devices will download it")
        return None
    return wire.Genesis(cfg.seed, codec, want)


def spec_payload(cfg: AggregatorConfig, signer: Signer, v0: F32 | None = None) -> bytes:
    """The model spec that every model message names by fingerprint, with how to build
    version 0 (:func:`genesis_of` ``v0``) while the aggregator holds it."""
    msg = wire.SpecMessage(cfg.federation.id, SENDER, cfg.spec, genesis=genesis_of(cfg, v0))
    return sealed(cfg, msg, signer)


def plan_extra(privacy: PrivacyConfig) -> dict[str, float]:
    """The plan's ``extra``: with central DP, the clip bound devices apply to their delta."""
    return {PLAN_CLIP_KEY: privacy.clip} if privacy.mode == "central" else {}


def plan_payload(cfg: AggregatorConfig, signer: Signer, revision: int) -> bytes:
    p = cfg.plan
    msg = wire.Plan(
        federation=cfg.federation.id,
        sender=SENDER,
        revision=revision,
        epochs=p.epochs,
        lr=p.lr,
        batch_size=p.batch_size,
        momentum=p.momentum,
        mu=p.mu,
        codec=p.codec,
        min_interval_s=p.min_interval_s,
        selection=p.selection,
        extra=plan_extra(cfg.privacy),
    )
    return sealed(cfg, msg, signer)


def onnx_bytes(  # noqa: PLR0917 - positional like its callers
    spec: ModelSpec,
    flat: F32,
    federation: str,
    version: int,
    created_at: float,
    threshold: float | None = None,
) -> bytes:
    """The ONNX export (raises ImportError if the onnx package is not installed)."""
    from fedmqtt.onnx_export import export_onnx

    params = spec.layout().unflatten(flat, copy=False)
    return export_onnx(
        spec,
        params,
        federation=federation,
        version=version,
        created_at=created_at,
        threshold=threshold,
    )


def onnx_payload(cfg: AggregatorConfig, signer: Signer, snap: Snapshot) -> bytes:
    data = onnx_bytes(
        cfg.spec, snap.params, cfg.federation.id, snap.version, snap.created_at, snap.threshold
    )
    msg = wire.OnnxModel(
        federation=cfg.federation.id,
        sender=SENDER,
        version=snap.version,
        onnx=data,
        created_at=snap.created_at,
    )
    return sealed(cfg, msg, signer)


def plan_digest(plan: PlanConfig, extra: dict[str, float] | None = None) -> str:
    """Digest of what the plan says (its ``selection`` and ``extra`` only when it has them, so
    a plan without them keeps the digest, and the revision, it always had)."""
    body: dict[str, Any] = asdict(plan)
    if plan.selection.everyone:
        del body["selection"]
    if extra:
        body["extra"] = extra
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def plan_revision(state_dir: Path, plan: PlanConfig, extra: dict[str, float] | None = None) -> int:
    """The revision of ``plan``: unchanged if the plan is, else one more than last time."""
    path = state_dir / PLAN_FILE
    digest = plan_digest(plan, extra)
    revision = 0
    try:
        saved: Any = json.loads(path.read_text())
        revision = int(saved["revision"])
        if saved.get("digest") == digest:
            return revision
    except FileNotFoundError:
        pass
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s unreadable (%s); the plan revision restarts above %d", path, e, revision)
    revision += 1
    atomic_write_bytes(
        path, json.dumps({"revision": revision, "digest": digest}).encode(), mode=0o600
    )
    return revision
