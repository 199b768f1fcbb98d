"""The aggregator side of the delta-downlink agent tests: a drifting model's versions, signed
and published as the aggregator publishes them, for one device over a real broker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from test_agent_helpers import SPEC, Device, FakeAggregator
from test_aggregator_support import Federation

from aggregator.config import AggregatorConfig
from aggregator.engine import Snapshot
from aggregator.keyframes import KeyframeStore, prepare
from fedmqtt import topics, wire
from fedmqtt.models import init_params
from simulator.broker import Mosquitto

LAYOUT = SPEC.layout()


def walk(versions: int, seed: int = 1) -> list[Snapshot]:
    """Versions 1..n of a model drifting as training would move it."""
    rng = np.random.default_rng(seed)
    p = LAYOUT.flatten(init_params(SPEC, rng))
    out = []
    for v in range(1, versions + 1):
        p = (p + rng.normal(0, 0.05, p.size)).astype(np.float32)
        out.append(Snapshot(1, v, b"", p.copy(), {"loss": 0.5}, 1000.0 + v))
    return out


class DeltaSite:
    """Signs and publishes versions of :func:`walk` for ``device`` as the aggregator would
    (full model, keyframe, top-k 10 % deltas from the three keyframes kept, announcement; all
    retained), with a keyframe every ``keyframe_every`` versions (never for size)."""

    def __init__(self, tmp_path: Path, broker: Mosquitto, device: Device) -> None:
        self.federation = Federation(tmp_path / "agg", SPEC)
        self.signer = device.aggregator
        self.store = KeyframeStore(tmp_path / "kf", keep=3)
        self.agg = FakeAggregator(broker, self.signer, {device.device_id: device.key})
        self.fed = self.cfg().federation.id
        self.snaps = walk(18)

    def cfg(self, keyframe_every: int = 100) -> AggregatorConfig:
        dl = {"delta": "topk:0.1+zlib", "keyframe_every": keyframe_every, "keyframe_fraction": 1.0}
        return self.federation.config("127.0.0.1", 1, downlink=dl)

    def release(
        self,
        version: int,
        *,
        delta: bytes | None = None,
        keyframe_every: int = 100,
        keyframes: tuple[int, ...] = (1,),
        announce: bool = True,
    ) -> bytes:
        """Publish ``version`` (``delta`` in place of its deltas); return the parameters a
        device holding keyframe ``keyframes[-1]`` rebuilds."""
        rel = prepare(self.cfg(keyframe_every), self.signer, self.store, self.snaps[version - 1])
        self.agg.publish(topics.model(self.fed), rel.model)
        if rel.keyframe is not None:
            self.agg.publish(topics.keyframe(self.fed), rel.keyframe)
        for base, payload in rel.deltas.items():
            self.agg.publish(topics.delta(self.fed, base), delta if delta is not None else payload)
        if announce:
            ann = wire.Announce(self.fed, "aggregator", version, SPEC.fingerprint(), 1.0, keyframes)
            self.agg.publish(topics.announce(self.fed), wire.encode(ann, self.signer))
        return rel.rebuilt.get(keyframes[-1], rel.sent).tobytes()
