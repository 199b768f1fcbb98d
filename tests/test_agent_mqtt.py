"""The edge agent against a real Mosquitto: delivery, outages, and hostile models."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from test_agent_helpers import (
    FED,
    N_CLASSES,
    N_FEATURES,
    SPEC,
    AgentThread,
    Device,
    FakeAggregator,
    accuracy,
    digits_like,
    global_model,
    make_device,
    model_payload,
    store_model,
    wait_until,
)

from edge_agent.agent import EdgeAgent
from edge_agent.state import (
    FEEDBACK_FILE,
    GLOBAL_MODEL_FILE,
    ONNX_MODEL_FILE,
    AgentState,
    StateStore,
    spec_file,
    spec_files,
    stored_specs,
)
from fedmqtt import topics, wire
from fedmqtt.codecs import ErrorFeedback, decode_params
from fedmqtt.models.spec import ModelSpec
from fedmqtt.sdnotify import Notifier
from fedmqtt.signing import Ed25519Signer, HmacKey, Signer
from simulator.broker import Mosquitto

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


def stored_version(device: Device) -> int:
    """The version of the model the agent stored, verified with the spec it stored."""
    stored = (device.state_dir / GLOBAL_MODEL_FILE).read_bytes()
    verifier = device.aggregator.verifier()
    specs = stored_specs(device.state_dir, verifier)
    return wire.decode(stored, wire.GlobalModel, verifier, specs=specs).version


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
        assert stored_version(device) == 1
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


def test_the_device_answers_in_the_wire_form_of_the_aggregator_it_hears(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    """An aggregator of an earlier release writes and reads only the long form: the device's
    updates and statuses follow the form of the aggregator's last verified message."""
    aggregator.compact = False
    aggregator.publish_plan(epochs=1, lr=0.1, codec="int8")
    aggregator.publish_model(1)
    runner = AgentThread(EdgeAgent(device.config(broker)))
    try:
        aggregator.wait_updates(1)
        aggregator.compact = True
        aggregator.publish_model(2)
        aggregator.wait_updates(2)
    finally:
        runner.stop()
    assert [wire.is_compact(r.payload) for r in aggregator.updates] == [False, True]
    # "online" is sent on connecting, before anything is heard: in the long form
    assert not wire.is_compact(aggregator.status_payloads[0])


class _Statuses(Notifier):
    """A disabled notifier that keeps every status line the agent sets."""

    def __init__(self) -> None:
        super().__init__(None)
        self.lines: list[str] = []

    def status(self, status: str) -> bool:
        self.lines.append(status)
        return True


def test_the_status_line_shows_a_delivery_at_once(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    """``systemctl status`` must not show an update as queued after the broker took it: the
    line is refreshed when a delivery changes it, not only every 30 s or at the next round."""
    aggregator.publish_plan(epochs=1, lr=0.1, codec="int8")
    aggregator.publish_model(1)
    notifier = _Statuses()
    agent = EdgeAgent(device.config(broker), notifier=notifier)
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        wait_until(lambda: agent.updates_sent == 1)
        wait_until(lambda: any("1 delivered, 0 queued" in ln for ln in notifier.lines), 3.0)
    finally:
        runner.stop()
    assert any("0 delivered, 1 queued" in ln for ln in notifier.lines)  # as queued, before


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
        # Each is left as the retained model, then a newer version is announced: the agent
        # fetches it (the model is not pushed to it) and refuses what it got.
        # (Waiting for the UNSUBACK that ends each fetch: a model published while the agent
        # is still subscribed would be delivered, and refused, once more.)
        announced = iter(range(2, 100))
        link = agent.link
        assert link is not None
        for n, (payload, _) in enumerate(forged, start=1):
            unsubscribed = link.counters.unsubscribed
            aggregator.publish(topics.model(FED), payload)
            aggregator.announce(next(announced))
            wait_until(lambda: sum(agent.rejected_models.values()) >= n)  # noqa: B023
            wait_until(lambda: link.counters.unsubscribed > unsubscribed)  # noqa: B023
        expected: dict[str, int] = {}
        for _, reason in forged:
            expected[reason] = expected.get(reason, 0) + 1
        assert agent.rejected_models == expected
        assert agent.current_version == 1
        assert stored_version(device) == 1
        # an old version, validly signed, is refused too (no rollback by replay)
        aggregator.publish(topics.model(FED), model_payload(0, device.aggregator))
        aggregator.announce(next(announced))
        wait_until(lambda: agent.rejected_models.get("old_version") == 1)
        # a model for another federation
        aggregator.publish(
            topics.model(FED), wire.encode(global_model(9, fed="other"), device.aggregator)
        )
        aggregator.announce(next(announced))
        wait_until(lambda: agent.rejected_models.get("federation") == 1)
        assert len(aggregator.received()) == 1
        # the agent still works: a valid new version is trained on
        aggregator.publish_model(next(announced))
        updates = aggregator.wait_updates(2)
        assert [u.base_version for u in updates] == [1, 10]
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


def test_int4_carries_its_rounding_error_in_memory_only(
    broker: Mosquitto,
    device: Device,
    aggregator: FakeAggregator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """int4 updates with error feedback: the residual of each round goes into the next one,
    and it is never written to flash; a top-k residual left on disk by an earlier plan goes
    out with the first int4 update and its file is removed."""
    shapes = SPEC.param_shapes()
    stale = ErrorFeedback({n: np.full(s, 0.01, np.float32) for n, s in shapes.items()})
    device.state_dir.mkdir(parents=True, exist_ok=True)
    (device.state_dir / FEEDBACK_FILE).write_bytes(stale.to_bytes())
    StateStore(device.state_dir).save(AgentState(feedback_spec=SPEC.fingerprint()))
    aggregator.publish_plan(codec="int4", epochs=1)
    aggregator.publish_model(1)
    cfg = device.config(broker, training={"interval_s": 0.2, "max_updates_per_version": 3})
    agent = EdgeAgent(cfg)
    residuals: list[dict[str, np.ndarray]] = []
    save = agent._save_feedback

    def record(fingerprint: str, *, persist: bool) -> None:
        residuals.append({k: v.copy() for k, v in agent._feedback.residual.items()})
        save(fingerprint, persist=persist)

    monkeypatch.setattr(agent, "_save_feedback", record)
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(3)
    finally:
        runner.stop()
    updates = aggregator.received()
    assert [u.base_version for u in updates] == [1, 1, 1]
    assert all(t["c"] == "int4" for u in updates for t in u.delta.values())
    assert not (device.state_dir / FEEDBACK_FILE).exists()
    assert len(residuals) == 3 and all(set(r) == set(shapes) for r in residuals)
    for r in residuals:  # below one step of its tensor's scale, never the stale 0.01 left
        assert not np.allclose(r["W0"], 0.01)
    assert not np.array_equal(residuals[0]["W0"], residuals[1]["W0"])


def test_a_refused_update_is_kept_and_delivered_once_the_acl_is_fixed(
    tmp_path: Path,
    device: Device,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With an ACL that forbids the device to publish updates, MQTT 5 answers PUBACK 0x87 *not
    authorized*: the agent keeps the update and retries; once the ACL is fixed and the broker
    reloaded, that same update arrives, once."""
    src = Path(__file__).resolve().parent.parent / "broker_config" / "mosquitto-dev.conf"
    conf_dir = tmp_path / "broker-conf"
    conf_dir.mkdir()
    # Mosquitto reads the ACL after dropping root privileges: keep it out of the private
    # pytest tmp directory.
    acl_dir = Path(tempfile.mkdtemp(prefix="fedmqtt-acl-"))
    acl_dir.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(acl_dir, ignore_errors=True))
    acl = acl_dir / "acl"
    downlink = (
        "topic readwrite fl/+/model\ntopic readwrite fl/+/plan\ntopic readwrite fl/+/spec\n"
        "topic readwrite fl/+/announce\n"
        "topic readwrite fl/+/model/onnx\ntopic readwrite fl/+/status/#\n"
    )
    acl.write_text(downlink + "topic read fl/+/updates/#\n")
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
                link = wait_until(lambda: agent.link)
                outbox = agent.outbox
                assert outbox is not None
                # Refused, kept, and retried (retry_s = 0.2 s): still the one update on disk.
                wait_until(lambda: link.counters.refused >= 2)
                [kept] = outbox.entries()
                assert (outbox.directory / kept.name).exists()
                assert agg.received() == [] and agent.updates_sent == 0
                acl.write_text(downlink + "topic readwrite fl/+/updates/#\n")
                broker.reload()
                [update] = agg.wait_updates(1)
                assert update.update_id == kept.update_id
                wait_until(lambda: len(outbox) == 0 and agent.updates_sent == 1)
                assert outbox.counters.dropped_refused == 0
                assert link.counters.refused_permanent == 0
                time.sleep(0.5)  # nothing more: the update is not sent again
                assert len(agg.received()) == 1
            finally:
                runner.stop()
        finally:
            agg.close()
    refusals = [
        r.getMessage()
        for r in caplog.records
        if r.name == "edge_agent.mqtt" and "broker refused update" in r.getMessage()
    ]
    assert refusals and all("Not authorized (0x87); keeping it" in r for r in refusals), refusals


def test_model_waits_for_its_spec_and_a_restart_offline_uses_the_stored_spec(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    other = ModelSpec("softmax", N_FEATURES, N_CLASSES)  # the same shape, other preprocessing
    aggregator.spec_published = True  # the model comes first, its spec later
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        wait_until(lambda: agent.rejected_models.get("unknown_spec", 0) >= 1)
        assert agent.current_version is None and agent.rounds_completed == 0
        # a spec signed by another key is refused and resolves nothing
        forged = wire.encode(wire.SpecMessage(FED, "aggregator", SPEC), Ed25519Signer.generate())
        aggregator.publish(topics.spec(FED), forged)
        wait_until(lambda: agent.rejected.get("spec/signature", 0) >= 1)
        assert agent.current_version is None
        # a genuine spec of another architecture does not resolve it either
        aggregator.publish_spec(other)
        wait_until(lambda: other.fingerprint() in agent.specs)
        assert agent.current_version is None
        # the model's own spec arrives: the model waiting for it is accepted and trained on
        aggregator.publish_spec(SPEC)
        [update] = aggregator.wait_updates(1)
        assert update.base_version == 1 and update.spec_fingerprint == SPEC.fingerprint()
    finally:
        runner.stop()
    # Only the model's spec and the newest one are kept (here the same).
    assert sorted(p.name for p in spec_files(device.state_dir)) == [spec_file(SPEC.fingerprint())]
    broker.stop()
    restarted = EdgeAgent(device.config(broker))
    runner = AgentThread(restarted)
    try:
        wait_until(lambda: restarted.current_version == 1)  # offline, from the state directory
        assert restarted.rejected_models == {}
    finally:
        runner.stop()


def _model_bytes(version: int, device: Device) -> int:
    return len(model_payload(version, device.aggregator))


def test_fetch_on_ready_downloads_the_newest_model_only_when_ready(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    """A throttled device downloads one model per round, the newest, not every version."""
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker, training={"interval_s": 2.0}))
    runner = AgentThread(agent)
    try:
        [first] = aggregator.wait_updates(1)
        assert first.base_version == 1
        for v in range(2, 21):  # 19 versions while the device may not train
            aggregator.publish_model(v)
        updates = aggregator.wait_updates(2)
        assert [u.base_version for u in updates] == [1, 20]  # trained on the newest
        wait_until(lambda: agent.announced == 20)
    finally:
        runner.stop()
    assert agent.rounds_completed == 2 and agent.fetches == 2
    # two models downloaded (v1 and v20), where pushing every version would have sent 20
    assert agent.downloaded["model"] == _model_bytes(1, device) + _model_bytes(20, device)
    # announcements only while ready: none of v2..v19, published while it was throttled
    assert 1 <= agent.received["announce"] <= 4
    assert 0 < agent.downloaded["announce"] < agent.downloaded["model"]
    assert agent.rejected == {}


def test_a_throttled_device_hears_announcements_only_when_ready(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    """One round per 2 s while 19 versions are published, one every 0.3 s: the device is
    subscribed to the announcements only while it may train, so it receives about one per
    round (the retained one when it becomes ready), not one per version."""
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker, training={"interval_s": 2.0}))
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        for v in range(2, 21):  # the publishing rate of a busy aggregator, not a wait
            aggregator.publish_model(v)
            time.sleep(0.3)
        wait_until(lambda: agent.current_version == 20)
        wait_until(lambda: agent.rounds_completed == len(aggregator.received()))
        rounds = agent.rounds_completed
        heard = agent.received["announce"]
    finally:
        runner.stop()
    assert rounds >= 3  # it kept training, on fresh versions
    assert heard <= 2 * rounds, f"{heard} announcements for {rounds} rounds"
    assert agent.fetches <= rounds + 1
    assert agent.rejected == {}


def test_a_retraining_device_hears_a_newer_version_before_it_retrains(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    """A device that may retrain a version every 1.5 s is not subscribed to the announcements
    while throttled; when due it first hears the retained one, so a version published in the
    meantime is fetched and trained on rather than the old one retrained."""
    aggregator.publish_model(1)
    cfg = device.config(broker, training={"interval_s": 1.5, "max_updates_per_version": 0})
    agent = EdgeAgent(cfg)
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        aggregator.publish_model(2)
        updates = aggregator.wait_updates(2)
    finally:
        runner.stop()
    assert [u.base_version for u in updates[:2]] == [1, 2]
    assert agent.fetches == 2


def test_offline_device_downloads_nothing_and_fetches_once_when_back(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
    finally:
        runner.stop()
    for v in range(2, 31):  # published while the device is away (its session persists)
        aggregator.publish_model(v)
    back = EdgeAgent(device.config(broker))
    runner = AgentThread(back)
    try:
        updates = aggregator.wait_updates(2)
        assert updates[1].base_version == 30
        assert back.current_version == 30
    finally:
        runner.stop()
    # one model and the retained, newest announcement (again when ready after its round):
    # nothing queued while away
    assert back.fetches == 1
    assert back.downloaded["model"] == _model_bytes(30, device)
    heard = back.received["announce"]
    assert 1 <= heard <= 2
    assert back.downloaded["announce"] == heard * len(aggregator.announce_payload(30))


def test_the_announcement_before_the_version_fetched_is_no_replay(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    """A model is retained before its announcement: a device that heard v3 announced may fetch
    v4, and then hear v3's retained announcement again when it subscribes. That is ignored
    without a count; an announcement older than any heard is still counted as a replay."""
    aggregator.publish_spec()
    aggregator.publish(topics.model(FED), model_payload(4, device.aggregator))
    aggregator.announce(3)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        [update] = aggregator.wait_updates(1)
        assert update.base_version == 4 and agent.announced == 3
        wait_until(lambda: agent.listening_since is not None)
        aggregator.announce(3)
        aggregator.announce(2)
        wait_until(lambda: agent.rejected.get("announce/old_version") == 1)
        assert agent.received["announce"] >= 3
        assert dict(agent.rejected) == {"announce/old_version": 1}
        assert agent.current_version == 4 and agent.fetches == 1
    finally:
        runner.stop()


def test_forged_and_stale_announcements_change_nothing(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    aggregator.publish_model(3)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        wait_until(lambda: agent.fetches == 1 and agent.announced == 3)
        # signed by another key, announcing a far newer version
        aggregator.announce(1000, signer=Ed25519Signer.generate())
        wait_until(lambda: agent.rejected.get("announce/signature") == 1)
        # validly signed but older: a replayed announcement
        aggregator.announce(2)
        wait_until(lambda: agent.rejected.get("announce/old_version") == 1)
        # the current one replayed: nothing to do, nothing counted
        aggregator.announce(3)
        # for another federation
        other = wire.Announce("other", "aggregator", 1000, SPEC.fingerprint())
        aggregator.publish(topics.announce(FED), wire.encode(other, device.aggregator))
        wait_until(lambda: agent.rejected.get("announce/federation") == 1)
        assert agent.announced == 3 and agent.fetches == 1
        assert agent.downloaded["model"] == _model_bytes(3, device)
        assert agent.current_version == 3 and len(aggregator.received()) == 1
        # a genuine newer one is still followed
        aggregator.publish_model(4)
        assert [u.base_version for u in aggregator.wait_updates(2)] == [3, 4]
    finally:
        runner.stop()
    assert agent.fetches == 2


def test_a_model_subscription_left_in_the_session_is_dropped(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator
) -> None:
    """A session that still subscribes the model (an agent killed mid-fetch, or one of an
    earlier release that subscribed to every version) stops receiving models once the agent
    connects: it asks only when ready."""
    old = paho.Client(CallbackAPIVersion.VERSION2, client_id=device.device_id, protocol=paho.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 3600
    subscribed = threading.Event()
    old.on_subscribe = lambda *a: subscribed.set()
    old.connect(broker.host, broker.port, clean_start=False, properties=props)
    old.loop_start()
    old.subscribe(topics.model(FED), qos=1)
    assert subscribed.wait(5)
    old.disconnect()
    old.loop_stop()
    # The device holds v1 already and may train once an hour: it never needs to fetch here.
    aggregator.publish_plan(min_interval_s=3600.0)
    aggregator.publish_model(1)  # also queued for the session
    store_model(device.state_dir, 1, device.aggregator)
    agent = EdgeAgent(device.config(broker))
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)  # its one round, on the stored v1
        wait_until(lambda: agent.plan is not None)
        before = agent.downloaded["model"]  # at most the v1 queued for the session
        for v in range(2, 12):
            aggregator.publish_model(v)
        aggregator.publish_plan(revision=2, min_interval_s=3600.0)  # a barrier: in order
        wait_until(lambda: agent.plan is not None and agent.plan.revision == 2)
        assert agent.downloaded["model"] == before <= _model_bytes(1, device)
        assert agent.fetches == 0 and agent.current_version == 1
        # throttled for an hour: not subscribed to the announcements either
        assert agent.announced in (None, 1)
    finally:
        runner.stop()


@pytest.mark.parametrize("predicts", [True, False])
def test_only_a_predicting_device_receives_the_onnx_export(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator, predicts: bool
) -> None:
    export = wire.encode(wire.OnnxModel(FED, "aggregator", 1, b"ONNX" * 500), device.aggregator)
    aggregator.publish(topics.model_onnx(FED), export)
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker, inference={"onnx": predicts}))
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        aggregator.publish_plan(revision=1)  # a barrier: delivered after anything sent before
        wait_until(lambda: agent.plan is not None)
    finally:
        runner.stop()
    stored = device.state_dir / ONNX_MODEL_FILE
    if predicts:
        assert agent.onnx_version == 1 and stored.read_bytes() == export
        assert agent.downloaded["onnx"] == len(export)
    else:
        assert agent.onnx_version is None and not stored.exists()
        assert agent.downloaded["onnx"] == 0
