"""The compressed downlink: the published model in the ``[downlink]`` codec is exactly what the
aggregator takes as the devices' model, is the same bytes when republished after a restart,
is refused when forged, and is what an agent trains on and restarts with offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from test_agent_helpers import SPEC, AgentThread, FakeAggregator, make_device, wait_until
from test_aggregator_support import Federation

from aggregator.checkpoint import decode_state
from aggregator.config import AggregatorConfig
from aggregator.engine import Engine, Snapshot
from aggregator.keyframes import KeyframeStore, prepare
from aggregator.metrics import Metrics
from aggregator.publish import (
    announce_payload,
    downlink_params,
    model_payload,
    onnx_payload,
    plan_payload,
    spec_payload,
)
from edge_agent.agent import EdgeAgent
from edge_agent.state import GLOBAL_MODEL_FILE
from fedmqtt import topics, wire
from fedmqtt.codecs import decode_params
from fedmqtt.errors import SIGNATURE, ConfigError, DecodeError
from fedmqtt.models import init_params
from fedmqtt.signing import Ed25519Signer
from simulator.broker import Mosquitto

pytestmark = pytest.mark.timeout(60)
CODECS = ("raw", "fp16", "int8", "int8+zlib")


def _config(tmp_path: Path, codec: str | None) -> tuple[Federation, AggregatorConfig]:
    fed = Federation(tmp_path, SPEC)
    tables = {} if codec is None else {"downlink": {"codec": codec}}
    return fed, fed.config("127.0.0.1", 1, **tables)


def _snapshot(version: int, seed: int = 1) -> Snapshot:
    params = SPEC.layout().flatten(init_params(SPEC, np.random.default_rng(seed)))
    params = params + np.random.default_rng(seed).normal(0, 0.3, params.size).astype(np.float32)
    return Snapshot(1, version, b"", params, {"loss": 0.5}, 1000.0 + version)


def _received(fed: Federation, payload: bytes) -> wire.GlobalModel:
    """The model as a device decodes it."""
    return wire.decode(payload, wire.GlobalModel, fed.verifier, specs={SPEC.fingerprint(): SPEC})


@pytest.mark.parametrize("codec", CODECS)
def test_a_device_decodes_exactly_the_aggregators_reference(tmp_path: Path, codec: str) -> None:
    fed, cfg = _config(tmp_path, codec)
    layout = SPEC.layout()
    snap = _snapshot(7)
    payload = model_payload(cfg, fed.signer, snap)
    _, reference = downlink_params(cfg, snap)  # computed again, as the evaluation does
    got = _received(fed, payload)
    assert got.version == 7 and got.stats == {"loss": 0.5}
    decoded = layout.flatten(got.params)
    assert decoded.tobytes() == reference.tobytes()  # bit for bit
    error = np.abs(decoded - snap.params)
    if codec == "raw":
        assert not error.any()
    else:  # within the codec's bound of the aggregator's float32 model, tensor by tensor
        for name, (lo, hi) in layout.offsets().items():
            biggest = float(np.max(np.abs(snap.params[lo:hi])))
            bound = biggest / 127 * 1.001 if codec.startswith("int8") else biggest * 2**-10
            assert float(np.max(error[lo:hi])) <= bound, name
    raw = model_payload(_config(tmp_path / "raw", "raw")[1], fed.signer, snap)
    assert codec == "raw" or len(payload) < len(raw) * (0.6 if codec == "fp16" else 0.45)


def test_the_default_downlink_and_its_refusals(tmp_path: Path) -> None:
    _, cfg = _config(tmp_path, None)
    assert cfg.downlink.codec == "int8"
    for bad in ("topk:0.1", "int7", "int8+gzip"):
        with pytest.raises(ConfigError, match=r"\[downlink\] codec"):
            _config(tmp_path / bad.replace(":", "_"), bad)


@pytest.mark.parametrize("compact", [True, False])
def test_everything_the_aggregator_publishes_is_in_the_configured_wire_form(
    tmp_path: Path, compact: bool
) -> None:
    """``[downlink] compact`` (default true); false: the long form an earlier release reads."""
    fed = Federation(tmp_path, SPEC)
    tables: dict[str, dict[str, object]] = {"downlink": {"delta": "int8", "keyframe_every": 2}}
    if not compact:
        tables["downlink"]["compact"] = False
    cfg = fed.config("127.0.0.1", 1, **tables)
    assert cfg.downlink.compact is compact
    store = KeyframeStore(tmp_path / "kf", keep=cfg.downlink.keyframes)
    first, second = (prepare(cfg, fed.signer, store, _snapshot(v)) for v in (1, 2))
    payloads = [
        first.model,
        second.announce,
        *second.deltas.values(),
        spec_payload(cfg, fed.signer),
        plan_payload(cfg, fed.signer, 1),
        onnx_payload(cfg, fed.signer, _snapshot(2)),
    ]
    assert second.deltas and first.keyframe is not None
    assert [wire.is_compact(p) for p in payloads] == [compact] * len(payloads)
    assert wire.decode(second.announce, wire.Announce, fed.verifier).version == 2


def test_a_version_republished_after_a_restart_is_the_same_bytes(tmp_path: Path) -> None:
    fed, cfg = _config(tmp_path, "int8")
    engine = Engine(cfg, Metrics(cfg.federation.id), None)
    engine.params = _snapshot(5).params
    engine.version = 5
    snap = engine.snapshot()
    restarted = Engine(cfg, Metrics(cfg.federation.id), None)
    restarted.restore(decode_state(snap.data))
    again = restarted.snapshot()
    assert model_payload(cfg, fed.signer, again) == model_payload(cfg, fed.signer, snap)
    # another version of the same parameters is rounded afresh (its own draws)
    other = Snapshot(1, 6, b"", snap.params, snap.stats, snap.created_at)
    assert downlink_params(cfg, other)[1].tobytes() != downlink_params(cfg, snap)[1].tobytes()


def test_a_forged_or_altered_compressed_model_is_refused(tmp_path: Path) -> None:
    fed, cfg = _config(tmp_path, "int8")
    snap = _snapshot(3)
    payload = bytearray(model_payload(cfg, fed.signer, snap))
    i = payload.rindex(b"\x7f")  # an int8 code of the largest magnitude
    payload[i] = 0x00
    with pytest.raises(DecodeError) as e:
        _received(fed, bytes(payload))
    assert e.value.reason == SIGNATURE
    forged = model_payload(cfg, Ed25519Signer.generate(), snap)
    with pytest.raises(DecodeError) as e:
        _received(fed, forged)
    assert e.value.reason == SIGNATURE


def test_the_aggregators_announcement_leaves_the_spec_unstated(tmp_path: Path) -> None:
    """The spec is the model message's business: the announcement keeps the field for
    receivers of earlier releases (a string, required there) but empty: the fingerprint's
    bytes fewer (65 of 203 for a 64-character fingerprint)."""
    fed, cfg = _config(tmp_path, "int8")
    payload = announce_payload(cfg, fed.signer, _snapshot(7))
    body = wire.unpack_body(wire.open_envelope(payload))
    assert body["spec"] == wire.UNSTATED_SPEC == ""
    assert wire.decode(payload, wire.Announce, fed.signer.verifier()).version == 7
    stated = wire.Announce(fed.federation, "aggregator", 7, cfg.spec.fingerprint(), 1.0)
    unstated = wire.Announce(fed.federation, "aggregator", 7, wire.UNSTATED_SPEC, 1.0)
    for compact, saved in ((False, len(cfg.spec.fingerprint())), (True, 8 + 1)):  # bin8 of 8
        sizes = [len(wire.encode(a, fed.signer, compact=compact)) for a in (stated, unstated)]
        assert sizes[0] - sizes[1] == saved


def test_an_agent_trains_on_and_restarts_with_the_decoded_model(
    broker: Mosquitto, tmp_path: Path
) -> None:
    device = make_device(tmp_path / "dev-1")
    fed, cfg = _config(tmp_path / "agg", "int8")
    snap = _snapshot(4)
    payload = model_payload(cfg, device.aggregator, snap)
    _, reference = downlink_params(cfg, snap)
    layout = SPEC.layout()
    agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    try:
        agg.publish_spec()
        agg.publish(topics.model(fed.federation), payload)
        agg.publish(topics.announce(fed.federation), announce_payload(cfg, device.aggregator, snap))
        agent = EdgeAgent(device.config(broker))
        runner = AgentThread(agent)
        try:
            [update] = agg.wait_updates(1)
        finally:
            runner.stop()
        assert update.base_version == 4
        assert agent.model is not None
        assert layout.flatten(agent.model.params).tobytes() == reference.tobytes()
        # what the device holds is the published message, so it decodes to the same model
        assert (device.state_dir / GLOBAL_MODEL_FILE).read_bytes() == payload
        trained = reference + decode_params(update.delta, layout)
        assert np.isfinite(trained).all() and np.any(trained != reference)
    finally:
        agg.close()
    broker.stop()  # a restart with no broker: the stored model, decoded the same way
    restarted = EdgeAgent(device.config(broker))
    runner = AgentThread(restarted)
    try:
        wait_until(lambda: restarted.current_version == 4)
        assert restarted.model is not None
        assert layout.flatten(restarted.model.params).tobytes() == reference.tobytes()
    finally:
        runner.stop()
