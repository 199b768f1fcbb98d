"""Version 0 built on the device from the signed spec message (seed, downlink codec, digest):
bit-identical to the version 0 the aggregator publishes and keeps as keyframe 0; a genesis that
does not build to its signed digest, or a forged spec message, is refused and version 0 is
fetched instead; an agent trains on the built version 0 and on deltas from it without
downloading any full model, and restarts with them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_agent_helpers import SPEC, AgentThread, FakeAggregator, make_device, wait_until
from test_aggregator_support import FED, Federation

from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, Snapshot
from aggregator.keyframes import KeyframeStore, prepare
from aggregator.metrics import Metrics
from aggregator.publish import genesis_of, spec_payload
from edge_agent import keyframe as kfm
from edge_agent.agent import EdgeAgent
from edge_agent.state import DELTA_FILE, GLOBAL_MODEL_FILE, KEYFRAME_FILE
from fedmqtt import downlink, topics, wire
from fedmqtt.errors import SIGNATURE, DecodeError
from fedmqtt.models import ModelSpec
from fedmqtt.signing import Ed25519Signer
from simulator.broker import Mosquitto

pytestmark = pytest.mark.timeout(60)
# An MLP: its initial weights come from the seed (a softmax starts at zero, whatever the seed).
MLP = ModelSpec(
    "mlp", SPEC.n_features, SPEC.n_outputs, hidden=(16,), feature_scale=SPEC.feature_scale
)
SPECS = {MLP.fingerprint(): MLP}
LAYOUT = MLP.layout()


def _cfg(tmp_path: Path, codec: str = "int8", seed: int = 3) -> AggregatorConfig:
    fed = Federation(tmp_path, MLP)
    return fed.config(
        "127.0.0.1", 1, downlink={"codec": codec, "delta": "topk:0.1+zlib"}, model={"seed": seed}
    )


def _spec_msg(payload: bytes, signer: Ed25519Signer) -> wire.SpecMessage:
    return wire.decode(payload, wire.SpecMessage, signer.verifier())


@pytest.mark.parametrize("codec", ["int8", "fp16", "raw", "int8+zlib", "int4", "int4+zlib"])
def test_the_built_version_zero_is_the_aggregators_bit_for_bit(tmp_path: Path, codec: str) -> None:
    cfg = _cfg(tmp_path, codec)
    signer = Ed25519Signer.generate()
    snap = Engine(cfg, Metrics(FED), keys=None).snapshot()  # the aggregator's own version 0
    assert snap.version == 0
    store = KeyframeStore(tmp_path / "kf", keep=3)
    rel = prepare(cfg, signer, store, snap)
    assert rel.keyframe is not None and store.versions() == [0]
    published = wire.decode(rel.keyframe, wire.GlobalModel, signer.verifier(), specs=SPECS)
    kept = store.frames[0].params
    assert LAYOUT.flatten(published.params).tobytes() == kept.tobytes()
    spec = _spec_msg(spec_payload(cfg, signer, kept), signer)
    assert spec.genesis == wire.Genesis(cfg.seed, codec, downlink.digest(kept))
    built = kfm.built_version_zero(spec)
    assert built.flat.tobytes() == kept.tobytes()  # bit for bit
    assert built.digest == store.frames[0].digest and built.version == 0
    assert built.msg.keyframe and built.msg.spec == MLP
    # A spec message without a version 0 (no longer held) says nothing about it, and an
    # older receiver reads a spec message with one as before (the field is optional).
    assert _spec_msg(spec_payload(cfg, signer), signer).genesis is None
    body = dict(spec.to_body())
    del body["init"]
    assert wire.SpecMessage.from_body(body).spec == MLP


def test_a_mismatched_or_forged_version_zero_is_refused(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    signer = Ed25519Signer.generate()
    v0 = downlink.genesis(MLP, cfg.seed, "int8")
    # the aggregator does not claim a version 0 that its seed does not build (another seed
    # at initialisation, a rolled-back state): devices download it then
    other = downlink.genesis(MLP, cfg.seed + 1, "int8")
    assert genesis_of(cfg, other) is None and genesis_of(cfg, v0) is not None
    good = _spec_msg(spec_payload(cfg, signer, v0), signer)
    assert good.genesis is not None
    for g, reason in (
        (wire.Genesis(cfg.seed + 1, "int8", good.genesis.digest), kfm.DIGEST),  # other seed
        (wire.Genesis(cfg.seed, "fp16", good.genesis.digest), kfm.DIGEST),  # other codec
        (wire.Genesis(cfg.seed, "int9", good.genesis.digest), kfm.CODEC),  # unknown codec
    ):
        lying = wire.SpecMessage(FED, "aggregator", MLP, 1.0, g)
        with pytest.raises(kfm.DeltaMismatchError) as m:
            kfm.built_version_zero(_spec_msg(wire.encode(lying, signer), signer))
        assert m.value.reason == reason
    forged = spec_payload(cfg, Ed25519Signer.generate(), v0)
    with pytest.raises(DecodeError) as e:
        _spec_msg(forged, signer)
    assert e.value.reason == SIGNATURE


def _walk(start: np.ndarray, versions: int) -> list[Snapshot]:
    rng = np.random.default_rng(1)
    p, out = start.copy(), []
    for v in range(1, versions + 1):
        p = (p + rng.normal(0, 0.05, p.size)).astype(np.float32)
        out.append(Snapshot(1, v, b"", p.copy(), {"loss": 0.5}, 1000.0 + v))
    return out


def test_an_agent_builds_version_zero_trains_on_deltas_from_it_and_restarts(
    broker: Mosquitto, tmp_path: Path
) -> None:
    device = make_device(tmp_path / "dev-1")
    signer = device.aggregator
    cfg = _cfg(tmp_path / "agg")
    store = KeyframeStore(tmp_path / "kf", keep=3)
    snap0 = Engine(cfg, Metrics(FED), keys=None).snapshot()
    agg = FakeAggregator(broker, signer, {device.device_id: device.key})

    def release(snap: Snapshot) -> bytes:
        """Publish ``snap`` as the aggregator does; the model devices on keyframe 0 get."""
        rel = prepare(cfg, signer, store, snap)
        agg.publish(topics.model(FED), rel.model)
        if rel.keyframe is not None:
            agg.publish(topics.keyframe(FED), rel.keyframe)
        for base, payload in rel.deltas.items():
            agg.publish(topics.delta(FED, base), payload)
        agg.publish(topics.announce(FED), rel.announce)
        return rel.sent.tobytes()

    try:
        sent0 = release(snap0)
        agg.publish(topics.spec(FED), spec_payload(cfg, signer, store.frames[0].params))
        agent = EdgeAgent(device.config(agg.broker))
        runner = AgentThread(agent)
        try:
            assert agg.wait_updates(1)[0].base_version == 0
            assert agent.model is not None
            assert LAYOUT.flatten(agent.model.params).tobytes() == sent0  # trained on it
            assert agent.keyframe is not None and agent.keyframe.version == 0
            assert agent.received["model"] == 0 and agent.fetches == 0  # nothing downloaded
            sent3 = release(_walk(store.frames[0].params, 3)[-1])
            assert agg.wait_updates(2)[1].base_version == 3
            assert LAYOUT.flatten(agent.model.params).tobytes() == sent3
            assert agent.received["delta"] == 1
            assert agent.received["model"] == 0 and agent.received["keyframe"] == 0
        finally:
            runner.stop()
        # Nothing of version 0 is stored; the spec message and the delta rebuild version 3.
        assert not (device.state_dir / KEYFRAME_FILE).exists()
        assert not (device.state_dir / GLOBAL_MODEL_FILE).exists()
        assert (device.state_dir / DELTA_FILE).exists()
        stored = kfm.load_newest(device.state_dir, signer.verifier(), SPECS)  # inference
        assert stored is not None and stored.version == 3
        assert LAYOUT.flatten(stored.params).tobytes() == sent3
        # Restart offline (no broker at that port): the last verified model, rebuilt.
        offline = EdgeAgent(device.config(None))
        offline._open()
        assert offline.current_version == 3 and offline.model is not None
        assert LAYOUT.flatten(offline.model.params).tobytes() == sent3
        assert offline.keyframe is not None and offline.keyframe.version == 0
    finally:
        agg.close()


def test_a_genesis_that_does_not_build_is_refused_and_version_zero_fetched(
    broker: Mosquitto, tmp_path: Path
) -> None:
    device = make_device(tmp_path / "dev-2", "dev-2")
    signer = device.aggregator
    cfg = _cfg(tmp_path / "agg")
    store = KeyframeStore(tmp_path / "kf", keep=3)
    rel = prepare(cfg, signer, store, Engine(cfg, Metrics(FED), keys=None).snapshot())
    agg = FakeAggregator(broker, signer, {device.device_id: device.key})
    try:
        agg.publish(topics.model(FED), rel.model)
        agg.publish(topics.announce(FED), rel.announce)
        real = store.frames[0].digest
        wrong = wire.Genesis(cfg.seed, "fp16", real)  # signed, but builds to another digest
        agg.publish(
            topics.spec(FED),
            wire.encode(wire.SpecMessage(FED, "aggregator", MLP, 1.0, wrong), signer),
        )
        agent = EdgeAgent(device.config(agg.broker))
        runner = AgentThread(agent)
        try:
            assert agg.wait_updates(1)[0].base_version == 0
            assert agent.rejected["genesis/digest"] == 1
            assert agent.received["model"] == 1  # fetched instead
            assert agent.model is not None
            assert LAYOUT.flatten(agent.model.params).tobytes() == rel.sent.tobytes()
            wait_until(lambda: agent.keyframe is not None)
            assert agent.keyframe is not None and agent.keyframe.digest == real
        finally:
            runner.stop()
    finally:
        agg.close()
