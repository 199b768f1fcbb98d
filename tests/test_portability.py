"""What the project needs from a broker beyond Mosquitto's defaults, checked against a real
Mosquitto made to behave like a clustered MQTT 5 broker (EMQX, HiveMQ, VerneMQ):

* one QoS 1 message in flight per session, both ways: ``max_inflight_messages 1`` (announced
  to clients as ``Receive Maximum = 1``) for what clients send, and ``[limits] broker_inflight
  = 1`` for what the broker sends the aggregator (Mosquitto takes a v5 client's own Receive
  Maximum there): neither the agent nor the aggregator sends more, the aggregator's buffer does
  not wait for updates the broker holds back, and nothing is lost or applied twice; and one
  aggregator process subscribes without a shared subscription;
* no PUBACK but a dropped connection: the update stays in the outbox and is sent again;
* retained messages not kept by the broker (restarted without its persistence, or a cluster
  node that never saw them): the aggregator publishes every retained message it owns again
  when it reconnects, the ONNX export included.
"""

from __future__ import annotations

import asyncio
import collections
import gc
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from mqtt_relay_support import MqttRelay
from paho.mqtt.enums import CallbackAPIVersion
from test_agent_helpers import SPEC, AgentThread, Device, FakeAggregator, make_device, wait_until
from test_aggregator_support import FED, Federation

from aggregator.config import BrokerConfig
from aggregator.mqtt import MqttLink
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from fedmqtt import topics, wire
from fedmqtt.signing import DEFAULT_UPDATE_AUTH, DEVICE_KEY_SUFFIX
from simulator.aggregator_thread import AggregatorThread
from simulator.broker import Mosquitto
from simulator.linkrun import running

pytestmark = pytest.mark.timeout(90)


def one_in_flight_broker(data_dir: Path) -> Mosquitto:
    """The development broker with ``max_inflight_messages 1``."""
    m = Mosquitto(data_dir=data_dir)
    text = m.config_path.read_text()
    assert "\nmax_inflight_messages 0\n" in text
    m.config_path.write_text(
        text.replace("\nmax_inflight_messages 0\n", "\nmax_inflight_messages 1\n")
    )
    return m.start()


@pytest.fixture
def narrow(tmp_path: Path) -> Iterator[Mosquitto]:
    m = one_in_flight_broker(tmp_path / "broker")
    try:
        yield m
    finally:
        m.close()


def enrolled_device(fed: Federation, root: Path, device_id: str) -> Device:
    """A device of ``fed``: it trusts the federation's signing key, the aggregator its key."""
    device = make_device(root, device_id, aggregator=fed.signer)
    suffix = DEVICE_KEY_SUFFIX[DEFAULT_UPDATE_AUTH]
    shutil.copy(root / "device.key", fed.root / "devices" / f"{device_id}{suffix}")
    return device


def test_one_message_in_flight_per_session_loses_nothing_and_applies_nothing_twice(
    narrow: Mosquitto, tmp_path: Path
) -> None:
    relay = MqttRelay(narrow.port)
    fed = Federation(tmp_path / "agg", SPEC, devices=(), federation=FED)
    # broker_inflight = 1: the aggregator asks Mosquitto for one message in flight to it (a
    # broker that imposes that on its own gives the same), and FedBuff's buffer of 2 is
    # applied an update at a time instead of waiting for a second one that cannot come.
    cfg = fed.config(
        "127.0.0.1",
        relay.port,
        strategy={"buffer_size": 2, "max_staleness": 1000},
        limits={"broker_inflight": 1},
    )
    seen: list[tuple[str | None, str | None]] = []
    agg = AggregatorThread(cfg, on_update=lambda uid, reason: seen.append((uid, reason))).start()
    delivered: list[str] = []
    runners: list[AgentThread] = []
    agents: list[EdgeAgent] = []
    try:
        for i in range(2):
            device = enrolled_device(fed, tmp_path / f"dev-{i}", f"dev-{i}")
            raw = device.config_dict(
                None,
                relay.port,
                training={"interval_s": 0.2, "max_updates_per_version": 0},
                outbox={"supersede": False},  # keep every update made while cut off
            )
            agent = EdgeAgent(AgentConfig.from_dict(raw), on_delivered=delivered.append)
            agents.append(agent)
            runners.append(AgentThread(agent))
        assert agg.wait_for(lambda s: s["accepted"] >= 4, 30), agg.snapshot()
        # Cut everyone off; the agents go on training, so on reconnection each holds several
        # updates, and the aggregator republishes its retained messages.
        relay.cut()
        for a in agents:
            outbox = a.outbox
            assert outbox is not None
            wait_until(lambda outbox=outbox: len(outbox) >= 3, 20)
        relay.restore()
        wait_until(lambda: all(a.outbox is not None and len(a.outbox) == 0 for a in agents), 30)
    finally:
        for r in runners:
            r.stop()
    # Updates in flight when an agent stopped are still in its outbox (sent at its next start).
    pending = {e.update_id for a in agents for e in (a.outbox.entries() if a.outbox else [])}

    def accepted() -> collections.Counter[str | None]:
        return collections.Counter(uid for uid, reason in list(seen) if reason is None)

    try:
        sent = set(delivered)
        assert len(sent) == len(delivered) == sum(a.updates_sent for a in agents)
        assert agg.wait_for(lambda _: sent <= set(accepted()), 30), agg.snapshot()
    finally:
        agg.stop()
        relay.close()
    assert set(accepted()) <= sent | pending, "applied an update no device sent"
    assert max(accepted().values()) == 1, "an update was applied twice"
    assert {reason for _, reason in seen if reason is not None} <= {"replay"}
    # The broker really kept one message in flight to each session, and nobody sent more.
    for cid in ("agg-test", "dev-0", "dev-1"):
        s = relay.session(cid)
        assert s.published_up >= 3 and s.published_down >= 1, (cid, s)
        assert s.max_up == 1, (cid, "sent more QoS 1 messages than Receive Maximum", s)
        assert s.max_down == 1, (cid, s)
    # One aggregator process ([scaleout] workers = 0) needs no shared subscription.
    assert topics.updates_filter(FED) in relay.session("agg-test").subscribed
    assert not any(f.startswith("$share/") for s in relay.sessions.values() for f in s.subscribed)


def test_the_aggregators_link_keeps_its_publishes_within_receive_maximum(
    narrow: Mosquitto,
) -> None:
    """Concurrent publishes (the publisher's and the metrics') wait for room: one at a time
    through a broker with Receive Maximum 1, each acknowledged."""
    relay = MqttRelay(narrow.port)
    cfg = BrokerConfig(host="127.0.0.1", port=relay.port, client_id="agg-link")
    link = MqttLink(cfg, subscriptions=["fl/x/updates/+"], receive_maximum=10)

    async def main() -> list[bool]:
        async with running(link):
            return await asyncio.gather(
                *(link.publish(f"fl/x/t{i}", b"x" * 1000, retain=True) for i in range(6))
            )

    try:
        assert asyncio.run(main()) == [True] * 6
    finally:
        relay.close()
    s = relay.session("agg-link")
    assert s.published_up == 6 and s.max_up == 1, s


def test_a_disconnect_instead_of_a_puback_keeps_the_update_and_sends_it_again(
    broker: Mosquitto, tmp_path: Path
) -> None:
    device = make_device(tmp_path / "dev-1")
    relay = MqttRelay(broker.port)
    fake = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    updates = topics.updates(fake_fed(device), device.device_id)
    relay.cut_on_publish(lambda cid, topic: topic == updates)
    try:
        fake.publish_model(1)
        agent = EdgeAgent(AgentConfig.from_dict(device.config_dict(None, relay.port)))
        runner = AgentThread(agent)
        try:
            [update] = fake.wait_updates(1)
            link = agent.link
            assert link is not None and agent.outbox is not None
            wait_until(lambda: agent.updates_sent == 1 and len(agent.outbox or ()) == 0)
            assert relay.cuts == [updates]  # the first attempt got a disconnect, no PUBACK
            assert link.counters.connects >= 2
            assert link.counters.refused == 0 and link.counters.refused_permanent == 0
        finally:
            runner.stop()
        assert [u.update_id for u in fake.received()] == [update.update_id]
    finally:
        fake.close()
        relay.close()


def fake_fed(device: Device) -> str:
    return str(device.config_dict(None)["device"]["federation"])


RETAINED = ("spec", "plan", "model", "announce", "model/onnx")


def retained_now(port: int, fed: Federation, timeout: float = 2.0) -> dict[str, bytes]:
    """What a fresh subscriber gets as retained messages on the federation's downlink topics,
    each verified with the aggregator's key (keyed by the topic's last part(s))."""
    got: dict[str, bytes] = {}
    done = threading.Event()
    names = {
        topics.spec(FED): "spec",
        topics.plan(FED): "plan",
        topics.model(FED): "model",
        topics.announce(FED): "announce",
        topics.model_onnx(FED): "model/onnx",
    }

    def on_message(c: Any, u: Any, msg: Any) -> None:
        if msg.retain:
            got[names[msg.topic]] = bytes(msg.payload)
            if len(got) == len(names):
                done.set()

    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.on_message = on_message
    c.on_connect = lambda c, *a: c.subscribe([(t, 1) for t in names])
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        done.wait(timeout)
    finally:
        c.disconnect()
        c.loop_stop()
    v = fed.verifier
    if "spec" in got:
        spec = wire.decode(got["spec"], wire.SpecMessage, v).spec
        if "model" in got:
            wire.decode(got["model"], wire.GlobalModel, v, specs={spec.fingerprint(): spec})
    others: dict[str, Any] = {
        "plan": wire.Plan,
        "announce": wire.Announce,
        "model/onnx": wire.OnnxModel,
    }
    for name, cls in others.items():
        if name in got:
            wire.decode(got[name], cls, v)
    return got


def test_retained_messages_lost_by_the_broker_are_published_again_on_reconnect(
    broker: Mosquitto, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = Federation(tmp_path / "agg", SPEC, devices=())
    cfg = fed.config(broker.host, broker.port, onnx={"every": 1})
    agg = AggregatorThread(cfg).start()
    try:
        before = wait_until(
            lambda: (r := retained_now(broker.port, fed)) and len(r) == len(RETAINED) and r, 30
        )
        # The broker comes back with no retained message at all.
        broker.kill()
        for f in broker.data_dir.glob("*.db"):
            f.unlink()
        broker.start()
        assert retained_now(broker.port, fed, timeout=0.3) != before
        after = wait_until(
            lambda: (r := retained_now(broker.port, fed)) and len(r) == len(RETAINED) and r, 30
        )
    finally:
        agg.stop()
    assert after["model/onnx"] == before["model/onnx"]  # the same signed export
    # The lost connection was handled: nothing is left for asyncio to report when collected.
    gc.collect()
    unretrieved = [r for r in caplog.records if "exception was never retrieved" in r.getMessage()]
    assert not unretrieved, unretrieved[0].getMessage()
