"""The delta downlink, device side: the keyframe a device holds, which message to fetch, and
the model rebuilt from a delta (docs/agent.md, *Downlink*; fedmqtt.downlink).

A device keeps the last *keyframe* it verified (a full model message the aggregator flagged
``keyframe``) in ``keyframe.bin``. When it is ready to train on a newer announced version it
fetches, in this order of preference:

1. ``fl/<fed>/delta/<K>`` if the announcement lists its keyframe ``K``, also when the announced
   version is itself a newer keyframe (a device keeps ``K`` while it is listed): the model is
   ``K``'s parameters plus the delta, checked bit for bit against the digest the aggregator
   signed;
2. ``fl/<fed>/model`` if the announced version is itself a keyframe (and 1 does not apply), or
   no keyframe is listed (no delta downlink), or a delta for this version already failed: the
   full model;
3. ``fl/<fed>/keyframe`` otherwise (its keyframe is too old or it has none): the newest
   keyframe, then the delta from it (1).

A delta that fails (forged, unknown spec, another base, a reconstruction whose digest differs)
is refused with a counted reason and the device fetches the full model of that version
instead. A delta topic found empty (cleared, or nothing within the fetch timeout) means its
keyframe was dropped, although an announcement published before may still list it: refused as
``missing``, and the device treats its keyframe as unlisted (rule 3, then 2), so that it
fetches the newest keyframe it will hold from then on rather than a full model now and a
keyframe at its next round.

Version 0 is not fetched when the signed spec message says how to build it
(:class:`fedmqtt.wire.Genesis`, :func:`built_version_zero`): the device builds it from the
model seed and holds it as keyframe 0 (and as its model while version 0 is the one announced)
if its digest is the signed one; otherwise it refuses it (``genesis/digest``, counted) and
fetches version 0 as above. Nothing is written for it: after a restart it is built again from
the stored spec message.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from edge_agent import state as st
from fedmqtt import downlink, topics, wire
from fedmqtt.errors import ConfigError, DecodeError
from fedmqtt.params import F32
from fedmqtt.signing import Verifier

BASE: Final = "base"  # rejection reason: a delta from another keyframe than the one held
DIGEST: Final = "digest"  # rejection reason: the rebuilt model is not the one signed for
MISSING: Final = "missing"  # rejection reason: the keyframe's delta topic was cleared
CODEC: Final = "codec"  # rejection reason: version 0 is encoded with a codec not known here


@dataclass(frozen=True)
class Held:
    """A verified keyframe: its message and parameters (flat) and their digest."""

    msg: wire.GlobalModel
    flat: F32
    digest: str

    @classmethod
    def of(cls, msg: wire.GlobalModel) -> Held:
        flat = msg.spec.layout().flatten(msg.params)
        return cls(msg, flat, downlink.digest(flat))

    @property
    def version(self) -> int:
        return self.msg.version


class DeltaMismatchError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def rebuild(kf: Held, d: wire.ModelDelta) -> wire.GlobalModel:
    """The model ``d`` sends to a device holding ``kf``; DeltaMismatchError if it is not for that
    keyframe or does not rebuild to the model the aggregator signed for."""
    if d.base != kf.version or d.base_digest != kf.digest:
        raise DeltaMismatchError(
            BASE, f"delta from v{d.base} ({d.base_digest}), keyframe held v{kf.version}"
        )
    if d.spec != kf.msg.spec:
        raise DeltaMismatchError(BASE, f"delta for spec {d.spec.fingerprint()}, keyframe's differs")
    flat = downlink.apply_delta(kf.flat, d.delta)
    got = downlink.digest(flat)
    if got != d.digest:
        raise DeltaMismatchError(DIGEST, f"v{d.version} rebuilds to {got}, signed for {d.digest}")
    return wire.GlobalModel(
        federation=d.federation,
        sender=d.sender,
        version=d.version,
        spec=d.spec,
        params=d.spec.layout().unflatten(flat, copy=False),
        created_at=d.created_at,
        threshold=d.threshold,
    )


def built_version_zero(spec_msg: wire.SpecMessage) -> Held:
    """Version 0 built from the genesis of the signed ``spec_msg`` (which has one), as keyframe
    0; DeltaMismatchError unless its digest is the signed one."""
    g = spec_msg.genesis
    assert g is not None
    try:
        flat = downlink.genesis(spec_msg.spec, g.seed, g.codec)
    except ConfigError as e:
        raise DeltaMismatchError(CODEC, f"version 0 in codec {g.codec!r}: {e}") from None
    got = downlink.digest(flat)
    if got != g.digest:
        raise DeltaMismatchError(DIGEST, f"version 0 builds to {got}, signed for {g.digest}")
    msg = wire.GlobalModel(
        federation=spec_msg.federation,
        sender=spec_msg.sender,
        version=0,
        spec=spec_msg.spec,
        params=spec_msg.spec.layout().unflatten(flat, copy=False),
        created_at=spec_msg.created_at,
        keyframe=True,
    )
    return Held(msg, flat, got)


def stored_version_zero(
    state_dir: Path, verifier: Verifier, federation: str | None = None
) -> Held | None:
    """Version 0 built from the newest stored spec message with a genesis that verifies and
    builds to its signed digest, if any."""
    for path in reversed(st.spec_files(state_dir)):
        try:
            msg = wire.decode(path.read_bytes(), wire.SpecMessage, verifier)
            if msg.genesis is not None and federation in (None, msg.federation):
                return built_version_zero(msg)
        except (OSError, DecodeError, DeltaMismatchError):
            continue
    return None


def choose(
    fed: str,
    *,
    announced: int | None,
    keyframes: tuple[int, ...],
    held: Held | None,
    failed: int | None,
) -> str:
    """The topic to fetch for announced version ``announced`` (rules in the module docstring);
    ``failed``: the version whose delta failed last."""
    if announced is None or not keyframes or failed == announced:
        return topics.model(fed)
    if held is not None and held.version in keyframes and held.version < announced:
        return topics.delta(fed, held.version)
    if max(keyframes) >= announced:
        return topics.model(fed)
    if held is None or held.version < max(keyframes):
        return topics.keyframe(fed)
    return topics.model(fed)


def load_newest(
    state_dir: Path,
    verifier: Verifier,
    specs: wire.SpecStore,
    federation: str | None = None,
) -> wire.GlobalModel | None:
    """The newest model stored in ``state_dir``: ``global_model.bin``, ``keyframe.bin`` (or
    version 0 built from a stored spec message) or the keyframe plus ``global_delta.bin``,
    whichever verifies and is newest (inference)."""
    found: list[wire.GlobalModel] = []
    kf: Held | None = None
    for name in (st.GLOBAL_MODEL_FILE, st.KEYFRAME_FILE):
        try:
            msg = wire.decode(
                (state_dir / name).read_bytes(), wire.GlobalModel, verifier, specs=specs
            )
        except (OSError, DecodeError):
            continue
        if federation is None or msg.federation == federation:
            found.append(msg)
            if name == st.KEYFRAME_FILE:
                kf = Held.of(msg)
    if kf is None:  # keyframe 0 built on the device (not stored)
        kf = stored_version_zero(state_dir, verifier, federation)
        if kf is not None:
            found.append(kf.msg)
    if kf is not None:
        try:
            d = wire.decode(
                (state_dir / st.DELTA_FILE).read_bytes(), wire.ModelDelta, verifier, specs=specs
            )
            found.append(rebuild(kf, d))
        except (OSError, DecodeError, DeltaMismatchError):
            pass
    return max(found, key=lambda m: m.version) if found else None
