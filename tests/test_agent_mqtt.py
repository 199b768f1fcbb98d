"""The edge agent against a real Mosquitto: delivery, outages, and hostile models."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
from test_agent_helpers import (
    FED,
    SPEC,
    AgentThread,
    Device,
    FakeAggregator,
    accuracy,
    digits_like,
    global_model,
    make_device,
    wait_until,
)

from edge_agent.agent import EdgeAgent
from edge_agent.state import FEEDBACK_FILE, GLOBAL_MODEL_FILE
from fedmqtt import topics, wire
from fedmqtt.broker import Mosquitto
from fedmqtt.codecs import decode_params
from fedmqtt.signing import Ed25519Signer, HmacKey, Signer

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def device(tmp_path: Path) -> Device:
    return make_device(tmp_path / "dev-1")


@pytest.fixture
def aggregator(broker: Mosquitto, device: Device) -> Iterator[FakeAggregator]:
    agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    try:
        yield agg
    finally:
        agg.close()


def _apply(update: wire.Update, base: wire.GlobalModel) -> dict[str, np.ndarray]:
    layout = SPEC.layout()
    flat = layout.flatten(base.params) + decode_params(update.delta, layout)
    return layout.unflatten(flat)


def test_happy_path_one_signed_update_per_version(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    aggregator.publish_plan(epochs=3, lr=0.1, codec="int8")
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        [update] = aggregator.wait_updates(1)
        # the payload verified with the device key (FakeAggregator decodes with it), and:
        assert update.sender == device.device_id and update.federation == FED
        assert update.base_version == 1
        assert update.spec_fingerprint == SPEC.fingerprint()
        assert update.num_samples == 300 and update.seq == 0
        assert len(update.update_id) == 32
        assert {t["c"] for t in update.delta.values()} == {"int8"}
        # the delta is a real training step: applied to the base it classifies held-out data
        X, y = digits_like(500, seed=99)
        base = global_model(1)
        assert accuracy(base.params, X, y) < 0.2
        assert accuracy(_apply(update, base), X, y) > 0.6
        # the broker acknowledged it, the outbox is empty, the model was stored verified
        wait_until(lambda: agent.updates_sent == 1 and len(agent.outbox or []) == 0)
        stored = (device.state_dir / GLOBAL_MODEL_FILE).read_bytes()
        assert wire.decode(stored, wire.GlobalModel, device.aggregator.verifier()).version == 1
        wait_until(lambda: device.device_id in aggregator.statuses)
        assert aggregator.statuses[device.device_id].state == "online"
        # at most one update per global version: nothing more arrives for v1 ...
        time.sleep(0.5)
        assert len(aggregator.received()) == 1
        # ... and a new version triggers the next round at once
        aggregator.publish_model(2)
        updates = aggregator.wait_updates(2)
        assert [u.base_version for u in updates] == [1, 2]
        assert [u.seq for u in updates] == [0, 1]
        assert len({u.update_id for u in updates}) == 2
    finally:
        runner.stop()
    assert agent.rounds_completed == 2 and agent.rejected_models == {}
    wait_until(lambda: aggregator.statuses[device.device_id].state == "offline")


def test_broker_down_at_start_keeps_retrying(broker: Mosquitto, device: Device) -> None:
    broker.stop()
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        wait_until(lambda: agent.link is not None and agent.link.counters.connect_attempts >= 3)
        assert not agent.link.connected  # type: ignore[union-attr]
        broker.start()
        agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
        try:
            agg.publish_model(5)
            [update] = agg.wait_updates(1)
            assert update.base_version == 5
            wait_until(lambda: agent.updates_sent == 1)
        finally:
            agg.close()
    finally:
        runner.stop()


def test_broker_killed_mid_run_nothing_lost_nothing_duplicated(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    # Retrain the same version every 0.25 s and keep every update (no superseding), so that
    # updates pile up in the outbox while the broker is away.
    cfg = device.config(
        broker,
        training={"interval_s": 0.25, "max_updates_per_version": 0},
        outbox={"supersede": False},
    )
    aggregator.publish_model(1)
    agent = EdgeAgent(cfg)
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(2)
        broker.kill()
        outbox = agent.outbox
        assert outbox is not None
        queued = wait_until(
            lambda: [e.update_id for e in outbox.entries()] if len(outbox) >= 3 else None
        )
        broker.start()
        wait_until(lambda: set(queued) <= {u.update_id for u in aggregator.received()}, 15)
    finally:
        runner.stop()
    received = aggregator.received()
    ids = [u.update_id for u in received]
    assert len(ids) == len(set(ids)), "an update was delivered twice"
    # none lost: every seq ever used was delivered or is still in the outbox
    pending = {e.seq for e in agent.outbox.entries()}  # type: ignore[union-attr]
    assert {u.seq for u in received} | pending == set(range(agent.state.next_seq))
    assert all(u.base_version == 1 for u in received)


def test_new_update_supersedes_unsent_ones(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    cfg = device.config(broker, training={"interval_s": 0.2, "max_updates_per_version": 0})
    aggregator.publish_model(1)
    agent = EdgeAgent(cfg)
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        broker.kill()
        outbox = agent.outbox
        assert outbox is not None
        wait_until(lambda: outbox.counters.superseded >= 3)
        assert len(outbox) <= 1 + cfg.outbox.max_in_flight  # newest + any in flight at the kill
        newest = max(e.seq for e in outbox.entries())
        broker.start()
        wait_until(lambda: max((u.seq for u in aggregator.received()), default=-1) >= newest, 15)
    finally:
        runner.stop()
    received = {u.seq for u in aggregator.received()}
    assert len(received) == len(aggregator.received()), "an update was delivered twice"
    # Every seq was superseded (and so never sent), or delivered, or is still queued; an
    # update can be both delivered and queued when the stop came before its PUBACK (it is
    # sent again at the next start and the aggregator refuses the replay).
    sent_or_queued = received | {e.seq for e in outbox.entries()}
    assert outbox.counters.dropped_cap == 0
    assert len(sent_or_queued) + outbox.counters.superseded == agent.state.next_seq
    assert sent_or_queued <= set(range(agent.state.next_seq))


class _WrongAlg:
    """An 'unsigned' message: an HMAC tag where the aggregator's Ed25519 signature belongs."""

    alg = "hmac-sha256"

    def sign(self, data: bytes | memoryview) -> bytes:
        return HmacKey.generate().sign(data)


def test_corrupted_unsigned_and_forged_models_are_ignored(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        forged: list[tuple[bytes, str]] = []
        # signed by another Ed25519 key
        forged.append((wire.encode(global_model(2), Ed25519Signer.generate()), "signature"))
        # a valid message with one byte of its body flipped
        good = bytearray(wire.encode(global_model(3), device.aggregator))
        good[-5] ^= 0x01
        forged.append((bytes(good), "signature"))
        # no signature at all: the bare body
        body = msgpack.packb(global_model(4).to_body(), use_bin_type=True)
        forged.append((body, "schema"))
        # the wrong kind of signature
        wrong: Signer = _WrongAlg()
        forged.append((wire.encode(global_model(5), wrong), "signature"))
        # garbage and a truncated message
        forged.append((b"\x00\xff" * 40, "schema"))
        forged.append((wire.encode(global_model(6), device.aggregator)[:30], "schema"))
        for n, (payload, _) in enumerate(forged, start=1):
            aggregator.publish(topics.model(FED), payload)
            wait_until(lambda: sum(agent.rejected_models.values()) >= n)  # noqa: B023
        expected: dict[str, int] = {}
        for _, reason in forged:
            expected[reason] = expected.get(reason, 0) + 1
        assert agent.rejected_models == expected
        assert agent.current_version == 1
        stored = (device.state_dir / GLOBAL_MODEL_FILE).read_bytes()
        assert wire.decode(stored, wire.GlobalModel, device.aggregator.verifier()).version == 1
        # an old version, validly signed, is refused too (no rollback by replay)
        aggregator.publish_model(0)
        wait_until(lambda: agent.rejected_models.get("old_version") == 1)
        # a model for another federation
        aggregator.publish(
            topics.model(FED), wire.encode(global_model(9, fed="other"), device.aggregator)
        )
        wait_until(lambda: agent.rejected_models.get("federation") == 1)
        assert len(aggregator.received()) == 1
        # the agent still works: a valid new version is trained on
        aggregator.publish_model(7)
        updates = aggregator.wait_updates(2)
        assert [u.base_version for u in updates] == [1, 7]
    finally:
        runner.stop()


def test_topk_keeps_error_feedback_and_retrains_per_config(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    aggregator.publish_plan(codec="topk:0.05", epochs=1)
    aggregator.publish_model(1)
    cfg = device.config(broker, training={"interval_s": 0.2, "max_updates_per_version": 2})
    agent = EdgeAgent(cfg)
    runner = AgentThread(agent)
    try:
        updates = aggregator.wait_updates(2)
        time.sleep(0.6)
        assert len(aggregator.received()) == 2  # exactly max_updates_per_version
    finally:
        runner.stop()
    assert [u.base_version for u in updates] == [1, 1]
    for u in updates:
        for name, t in u.delta.items():
            assert t["c"] == "topk"
            assert t["k"] == max(1, int(np.ceil(0.05 * np.prod(SPEC.param_shapes()[name]))))
    from fedmqtt.codecs import ErrorFeedback

    fb = ErrorFeedback.from_bytes((device.state_dir / FEEDBACK_FILE).read_bytes())
    assert set(fb.residual) == {"W0", "b0"}
    assert float(np.abs(fb.residual["W0"]).sum()) > 0


def test_permanent_broker_refusal_drops_the_update(
    tmp_path: Path,
    device: Device,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With an ACL that forbids the device to publish updates, MQTT 5 answers 0x87."""
    src = Path(__file__).resolve().parent.parent / "broker_config" / "mosquitto-dev.conf"
    conf_dir = tmp_path / "broker-conf"
    conf_dir.mkdir()
    # Mosquitto reads the ACL after dropping root privileges: keep it out of the private
    # pytest tmp directory.
    acl_dir = Path(tempfile.mkdtemp(prefix="fedmqtt-acl-"))
    acl_dir.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(acl_dir, ignore_errors=True))
    acl = acl_dir / "acl"
    acl.write_text(
        "topic readwrite fl/+/model\ntopic readwrite fl/+/plan\n"
        "topic readwrite fl/+/model/onnx\ntopic readwrite fl/+/status/#\n"
        "topic read fl/+/updates/#\n"
    )
    acl.chmod(0o644)
    (conf_dir / "mosquitto-dev.conf").write_text(src.read_text() + f"\nacl_file {acl}\n")
    monkeypatch.setenv("FEDMQTT_BROKER_CONFIG_DIR", str(conf_dir))
    with Mosquitto(data_dir=tmp_path / "acl-broker") as broker:
        agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
        try:
            agg.publish_model(1)
            agent = EdgeAgent(device.config(broker))
            runner = AgentThread(agent)
            try:
                wait_until(
                    lambda: agent.link is not None and agent.link.counters.refused_permanent == 1
                )
                outbox = agent.outbox
                assert outbox is not None
                wait_until(lambda: len(outbox) == 0)
                assert outbox.counters.dropped_refused == 1
                time.sleep(0.5)
                assert agent.link is not None
                assert agent.link.counters.refused_permanent == 1  # not retried
                assert agent.updates_sent == 0 and agg.received() == []
            finally:
                runner.stop()
        finally:
            agg.close()
    # refused_permanent also counts an oversize update and paho's own refusal: the drop must
    # come from the broker's PUBACK with reason code 0x87 (Not authorized).
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.name == "edge_agent.mqtt" and "broker refused update" in r.getMessage()
    ]
    assert len(refusals) == 1, refusals
    assert "Not authorized (0x87); dropped" in refusals[0], refusals
