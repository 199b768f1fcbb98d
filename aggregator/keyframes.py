"""The delta downlink, aggregator side: keyframes kept, and what each version publishes.

With ``[downlink] delta`` set (a codec, e.g. ``topk:0.05+zlib``), every published version
``V`` goes out as (in this order, all retained and signed):

1. the full model on ``fl/<fed>/model`` (``[downlink] codec``), flagged ``keyframe`` when
   ``V`` becomes a keyframe: when no keyframe is kept, when ``V`` is ``keyframe_every``
   versions past the newest keyframe, or when its delta from the newest keyframe would exceed
   ``keyframe_fraction`` of the full model message;
2. a new keyframe also on ``fl/<fed>/keyframe`` (what a device without a usable keyframe
   fetches first), and an empty retained message on ``fl/<fed>/delta/<K>`` of each keyframe
   dropped (the newest ``keyframes`` are kept);
3. for each kept keyframe ``K < V`` a :class:`fedmqtt.wire.ModelDelta` from ``K`` to ``V`` on
   ``fl/<fed>/delta/<K>``;
4. the announcement, listing the kept keyframes.

A keyframe is kept as its signed full model message in ``<state_dir>/keyframes/`` (written
atomically before it is published), so a restarted aggregator serves deltas from the
keyframes devices hold and republishes the keyframe message byte for byte. Its parameters are
what devices decode from it; each delta is encoded from the aggregator's float32 parameters
minus those (fedmqtt.downlink), so the model a device reconstructs is exactly the one computed
here, and what a delta leaves out is sent by the next one.
"""

from __future__ import annotations

import asyncio
import logging
import re
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from aggregator.config import AggregatorConfig
from aggregator.engine import Snapshot
from aggregator.mqtt import MqttLink
from aggregator.publish import SENDER, model_message, sealed
from fedmqtt import downlink, topics, wire
from fedmqtt.codecs import Codec
from fedmqtt.errors import DecodeError
from fedmqtt.fsutil import atomic_write_bytes, remove_durably
from fedmqtt.params import F32
from fedmqtt.signing import Ed25519Signer

log = logging.getLogger(__name__)

KEYFRAME_DIR: Final = "keyframes"
_NAME = re.compile(r"kf-(\d{12})\.bin")


@dataclass(frozen=True)
class Keyframe:
    version: int
    payload: bytes  # the signed full model message, as published
    params: F32  # what devices decode from it
    digest: str


class KeyframeStore:
    """The newest ``keep`` keyframes, one file each (the signed model message)."""

    def __init__(self, directory: Path, *, keep: int) -> None:
        self.directory = directory
        self.keep = keep
        self.frames: dict[int, Keyframe] = {}

    def path_for(self, version: int) -> Path:
        return self.directory / f"kf-{version:012d}.bin"

    def load(self, cfg: AggregatorConfig, signer: Ed25519Signer, *, upto: int) -> None:
        """Read the kept keyframes; drop (and delete) any that does not verify, is of another
        spec, or is newer than version ``upto`` (the aggregator's current one)."""
        self.frames.clear()
        if not self.directory.is_dir():
            return
        spec = cfg.spec
        for path in sorted(self.directory.iterdir()):
            m = _NAME.fullmatch(path.name)
            if m is None:
                continue
            why = ""
            try:
                msg = wire.decode(
                    path.read_bytes(),
                    wire.GlobalModel,
                    signer.verifier(),
                    specs={spec.fingerprint(): spec},
                )
                if msg.version != int(m.group(1)) or msg.federation != cfg.federation.id:
                    why = "names another version or federation"
                elif msg.version > upto:
                    why = f"is newer than the current version {upto}"
                else:
                    flat = spec.layout().flatten(msg.params)
                    self.frames[msg.version] = Keyframe(
                        msg.version, path.read_bytes(), flat, downlink.digest(flat)
                    )
            except (OSError, DecodeError) as e:
                why = f"is unreadable ({e})"
            if why:
                log.warning("keyframe file %s %s; dropped", path, why)
                self._remove(path)
        self._prune()
        if self.frames:
            log.info("keyframes kept: %s", ", ".join(f"v{v}" for v in self.versions()))

    def versions(self) -> list[int]:
        return sorted(self.frames)

    def newest(self) -> Keyframe | None:
        return self.frames[max(self.frames)] if self.frames else None

    def add(self, version: int, payload: bytes, params: F32) -> list[int]:
        """Keep ``version`` (durably); return the keyframe versions dropped to make room."""
        if version in self.frames:
            return []
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(self.path_for(version), payload, mode=0o600)
        self.frames[version] = Keyframe(version, payload, params, downlink.digest(params))
        return self._prune()

    def _prune(self) -> list[int]:
        dropped = sorted(self.frames)[: max(len(self.frames) - self.keep, 0)]
        for v in dropped:
            del self.frames[v]
            self._remove(self.path_for(v))
        return dropped

    @staticmethod
    def _remove(path: Path) -> None:
        try:
            remove_durably(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("cannot remove %s: %s", path, e)


@dataclass
class Release:
    """What one version publishes (see the module docstring), in order."""

    model: bytes
    keyframe: bytes | None  # the new keyframe's message, if this version is one
    dropped: list[int]
    deltas: dict[int, bytes]
    announce: bytes
    sent: F32  # the model devices on the oldest kept keyframe train on (evaluated)
    rebuilt: dict[int, F32] = field(default_factory=dict)  # by keyframe: what its holders get
    delta_bytes: dict[int, int] = field(default_factory=dict)


def delta_payload(
    cfg: AggregatorConfig, signer: Ed25519Signer, snap: Snapshot, base: Keyframe
) -> tuple[bytes, F32]:
    """The signed delta from keyframe ``base`` to ``snap``, and the model it reconstructs."""
    layout = cfg.spec.layout()
    codec = Codec.parse(cfg.downlink.delta)
    encoded, sent = downlink.encode_delta(
        layout,
        snap.params,
        base.params,
        codec,
        seed=cfg.seed,
        version=snap.version,
        base_version=base.version,
    )
    msg = wire.ModelDelta(
        federation=cfg.federation.id,
        sender=SENDER,
        version=snap.version,
        base=base.version,
        spec=cfg.spec,
        base_digest=base.digest,
        digest=downlink.digest(sent),
        delta=sent,  # not sent: ``encoded`` is
        created_at=snap.created_at,
        encoded=encoded,
        threshold=snap.threshold,
    )
    return sealed(cfg, msg, signer), sent


def prepare(
    cfg: AggregatorConfig, signer: Ed25519Signer, store: KeyframeStore, snap: Snapshot
) -> Release:
    """Decide whether ``snap`` is a keyframe, keep it if so, and sign everything it publishes
    (runs on the publisher thread)."""
    dl = cfg.downlink
    full, full_flat = model_message(cfg, snap, keyframe=False)
    full_payload = sealed(cfg, full, signer)
    deltas: dict[int, tuple[bytes, F32]] = {}
    newest = store.newest()
    is_kf = newest is None or snap.version in store.frames
    if newest is not None and snap.version > newest.version:
        if snap.version - newest.version >= dl.keyframe_every:
            is_kf = True
        else:
            deltas[newest.version] = delta_payload(cfg, signer, snap, newest)
            if len(deltas[newest.version][0]) > dl.keyframe_fraction * len(full_payload):
                is_kf = True
    kf_payload: bytes | None = None
    dropped: list[int] = []
    if is_kf:
        if snap.version in store.frames:
            kf_payload = store.frames[snap.version].payload  # republished as it was
        else:
            full = model_message(cfg, snap, keyframe=True)[0]
            kf_payload = sealed(cfg, full, signer)
            dropped = store.add(snap.version, kf_payload, full_flat)
            log.info("version %d is a keyframe (%d bytes)", snap.version, len(kf_payload))
        full_payload = kf_payload
    for kf in store.frames.values():
        if kf.version < snap.version and kf.version not in deltas:
            deltas[kf.version] = delta_payload(cfg, signer, snap, kf)
    for v in dropped:
        deltas.pop(v, None)
    kept = tuple(store.versions())
    ann = wire.Announce(
        cfg.federation.id, SENDER, snap.version, wire.UNSTATED_SPEC, snap.created_at, kept
    )
    # Devices keep their keyframe while it is listed (edge_agent.keyframe.choose): the model
    # rebuilt from the oldest one is what the devices holding a keyframe longest train on.
    rebuilt = {k: flat for k, (_, flat) in deltas.items()}
    sent = rebuilt[min(rebuilt)] if rebuilt else full_flat
    return Release(
        model=full_payload,
        keyframe=kf_payload,
        dropped=dropped,
        deltas={k: p for k, (p, _) in deltas.items()},
        announce=sealed(cfg, ann, signer),
        sent=sent,
        rebuilt=rebuilt,
        delta_bytes={k: len(p) for k, (p, _) in deltas.items()},
    )


class DeltaPublisher:
    """Publishes each version as above through the service's MQTT link."""

    def __init__(
        self, cfg: AggregatorConfig, signer: Ed25519Signer, pub_x: Executor, *, upto: int
    ) -> None:
        self.cfg = cfg
        self.signer = signer
        self.pub_x = pub_x
        self.store = KeyframeStore(cfg.state_dir / KEYFRAME_DIR, keep=cfg.downlink.keyframes)
        self.store.load(cfg, signer, upto=upto)
        self._keyframe_sent: int | None = None  # the keyframe on fl/<fed>/keyframe

    async def publish(
        self, link: MqttLink, snap: Snapshot, *, republish: bool
    ) -> tuple[bool, F32 | None]:
        """Publish ``snap``; (all published?, the model devices on the newest keyframe hold)."""
        loop = asyncio.get_running_loop()
        fed = self.cfg.federation.id
        rel = await loop.run_in_executor(
            self.pub_x, prepare, self.cfg, self.signer, self.store, snap
        )
        if not await link.publish(topics.model(fed), rel.model, retain=True):
            return False, None
        newest = self.store.newest()
        if newest is not None and (republish or self._keyframe_sent != newest.version):
            if not await link.publish(topics.keyframe(fed), newest.payload, retain=True):
                return False, None
            self._keyframe_sent = newest.version
        for v in rel.dropped:  # clear the retained delta of a keyframe no longer kept
            if not await link.publish(topics.delta(fed, v), b"", retain=True):
                return False, None
        for base, payload in sorted(rel.deltas.items()):
            if not await link.publish(topics.delta(fed, base), payload, retain=True):
                return False, None
        ok = await link.publish(topics.announce(fed), rel.announce, retain=True)
        return ok, rel.sent
