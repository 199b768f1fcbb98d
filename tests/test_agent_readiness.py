"""When the agent listens for version announcements: ``[training] fast_repeat_s`` and
``announce_wait_s`` (defaults in fedmqtt.readiness), against a real Mosquitto. The SUBSCRIBE
packets are counted by an MQTT-reading relay between the agent and the broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import numpy as np
import pytest
from mqtt_relay_support import MqttRelay
from test_agent_helpers import (
    FED,
    AgentThread,
    Device,
    FakeAggregator,
    global_model,
    make_device,
    model_payload,
    spec_payload,
    wait_until,
)

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig, TrainingConfig
from edge_agent.relisten import Relisten
from edge_agent.state import GLOBAL_MODEL_FILE, KEYFRAME_FILE
from fedmqtt import readiness, topics, wire
from fedmqtt.errors import ConfigError
from simulator.broker import Mosquitto

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pair(broker: Mosquitto, tmp_path: Path) -> Iterator[tuple[Device, FakeAggregator]]:
    """A device and the paho stand-in for its aggregator (checked for bad messages after)."""
    device = make_device(tmp_path / "dev-1")
    fake = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    yield device, fake
    fake.close()


def test_the_defaults_are_fedmqtts_and_negative_values_are_refused(tmp_path: Path) -> None:
    device = make_device(tmp_path / "dev-1")
    t = TrainingConfig()
    assert t.announce_wait_s == readiness.ANNOUNCE_WAIT_S == 3.0
    assert t.fast_repeat_s == readiness.FAST_REPEAT_S == 1.0
    cfg = device.config(None, training={"announce_wait_s": 0.5, "fast_repeat_s": 0})
    assert (cfg.training.announce_wait_s, cfg.training.fast_repeat_s) == (0.5, 0.0)
    for option in ("announce_wait_s", "fast_repeat_s"):
        with pytest.raises(ConfigError, match=rf"\[training\] {option}: must be >= 0"):
            device.config(None, training={option: -1.0})


def announce_subscribes(
    broker: Mosquitto, pair: tuple[Device, FakeAggregator], **training: Any
) -> tuple[int, int]:
    """Eight versions, each published once the device trained on the one before (a device
    that is ready again right after each round): (SUBSCRIBEs to the announcements, rounds)."""
    device, aggregator = pair
    relay = MqttRelay(broker.port)
    raw = device.config_dict(None, relay.port, training=training)
    agent = EdgeAgent(AgentConfig.from_dict(raw))
    try:
        runner = AgentThread(agent)
        try:
            for v in range(1, 9):
                aggregator.publish_model(v)
                wait_until(lambda v=v: v in {u.base_version for u in aggregator.received()})
        finally:
            runner.stop()
        return relay.session(device.device_id).subscribed[topics.announce(FED)], len(
            aggregator.received()
        )
    finally:
        relay.close()


@pytest.fixture
def unmeasured(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device never knows when to listen again during a round (edge_agent.relisten), as
    before its first round and first announcement: it stays subscribed throughout."""
    monkeypatch.setattr(Relisten, "active", lambda self, interval: False)
    monkeypatch.setattr(Relisten, "at", lambda self, started, interval: None)


@pytest.mark.usefixtures("unmeasured")
def test_a_device_ready_again_at_once_stays_subscribed_to_the_announcements(
    broker: Mosquitto, pair: tuple[Device, FakeAggregator]
) -> None:
    """No interval, and no measurement of when to listen again during a round: the device
    keeps its subscription through fetches and rounds (one SUBSCRIBE after its first round),
    rather than a round trip through the broker before every fetch."""
    subscribes, rounds = announce_subscribes(broker, pair)
    assert rounds == 8
    assert subscribes <= 2, f"{subscribes} SUBSCRIBEs to the announcements for {rounds} rounds"


def test_fast_repeat_s_zero_listens_only_while_ready(
    broker: Mosquitto, pair: tuple[Device, FakeAggregator]
) -> None:
    subscribes, rounds = announce_subscribes(broker, pair, fast_repeat_s=0.0)
    assert rounds == 8
    assert subscribes >= 8, f"{subscribes} SUBSCRIBEs to the announcements for {rounds} rounds"


@pytest.mark.parametrize("paced_by", ["training", "interval"])
def test_longer_rounds_do_not_hear_the_versions_published_meanwhile(
    broker: Mosquitto, pair: tuple[Device, FakeAggregator], paced_by: str
) -> None:
    """Rounds every ~0.3 s (training that long, or ``interval_s = 0.3`` with retraining, as
    ``fedmqtt simulate`` paces its devices), a version published every 30 ms: the device is
    ready again soon after each round, but it does not listen from its fetch until a lead
    before its next round, and then only until it hears of a newer version
    (edge_agent.relisten). It hears one or two announcements per round, not the ~10
    published, and trains every round on a newer one."""
    device, aggregator = pair

    def slow(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.3)  # the device's compute time
        return X, y

    if paced_by == "training":
        agent = EdgeAgent(device.config(broker), data_transform=slow)
    else:
        training = {"interval_s": 0.3, "max_updates_per_version": 0}
        agent = EdgeAgent(device.config(broker, training=training))
    stop = threading.Event()
    published = [0]

    def publish() -> None:
        while not stop.is_set():
            aggregator.publish_model(published[0] + 1)
            published[0] += 1
            stop.wait(0.03)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(3, timeout=30)  # the lead and a round's length are measured
        heard, version = agent.received["announce"], published[0]
        aggregator.wait_updates(7, timeout=30)
        heard, versions = agent.received["announce"] - heard, published[0] - version
    finally:
        stop.set()
        publisher.join(10)
        runner.stop()
    bases = [u.base_version for u in aggregator.received()]
    assert bases == sorted(set(bases)), bases  # a newer version every round
    assert versions >= 20, f"only {versions} versions published in four rounds"
    # Listening throughout would hear all of them. Each round hears the retained one, the first
    # newer one if the retained one was not, and at times one in flight as it unsubscribes.
    assert heard <= 3 * 4, f"{heard} announcements heard of {versions} published"


def test_a_model_delivered_after_its_fetch_ended_is_passed_over(tmp_path: Path) -> None:
    """A model published as a fetch ends can arrive after it, before the broker took the
    unsubscription. Installed, the device would train on it when next due instead of fetching
    the newest (under load, a device paced at 0.3 s with versions every 30 ms then trained
    every other round on the version just after the one it fetched); it is passed over, and
    only a model arriving while the model is being fetched is taken."""
    device = make_device(tmp_path / "dev-1")
    agent = EdgeAgent(device.config(None))  # never connected: the inbox is filled here
    agent._accept_spec(spec_payload(device.aggregator))
    model = topics.model(FED)
    agent._fetch_topic, agent._fetching_since = model, 0.0
    # The fetch's own batch: the retained model and one published meanwhile, the newest wins.
    agent._inbox.put(model, model_payload(4, device.aggregator))
    agent._inbox.put(model, model_payload(5, device.aggregator))
    agent._drain_inbox()
    assert agent.current_version == 5 and agent._fetching_since is None
    stored = (agent.state_dir / GLOBAL_MODEL_FILE).read_bytes()
    # A later batch: passed over, not stored, and not refused either.
    agent._inbox.put(model, model_payload(6, device.aggregator))
    agent._drain_inbox()
    assert agent.current_version == 5 and agent.rejected == {}
    assert (agent.state_dir / GLOBAL_MODEL_FILE).read_bytes() == stored
    # Announced, it is fetched when the device is due (nothing held back the fetch).
    agent.announced = 6
    assert agent._knows_newer()


def test_a_keyframe_delivered_after_its_fetch_ended_is_held_and_trained_on_only_when_announced(
    tmp_path: Path,
) -> None:
    """A late keyframe is kept as the base of later deltas but not trained on: when it is the
    version announced, the device takes it without a download; a newer one is fetched as a
    delta from it."""
    device = make_device(tmp_path / "dev-1")
    agent = EdgeAgent(device.config(None))
    agent._accept_spec(spec_payload(device.aggregator))
    model = topics.model(FED)
    agent._fetch_topic, agent._fetching_since = model, 0.0
    agent._inbox.put(model, model_payload(5, device.aggregator))
    agent._drain_inbox()
    late = wire.encode(replace(global_model(6), keyframe=True), device.aggregator)
    agent._inbox.put(model, late)
    agent._drain_inbox()
    assert agent.current_version == 5 and agent.rejected == {}
    assert agent.keyframe is not None and agent.keyframe.version == 6
    assert (agent.state_dir / KEYFRAME_FILE).read_bytes() == late
    fetched: list[str] = []
    agent.link = cast(
        Any,
        SimpleNamespace(
            connected=True,
            fetch=fetched.append,
            watch=lambda *a: None,
            release=lambda *a: None,
            counters=SimpleNamespace(delivered=0),
        ),
    )  # only what a fetch uses
    agent._fetched_untrained = False  # the round on v5 is done
    agent.announced, agent.announced_keyframes = 6, (6,)
    agent._fetch_if_ready()
    assert agent.current_version == 6 and fetched == []  # no download
    agent.announced = 7
    agent._fetched_untrained = False
    agent._fetch_if_ready()
    assert fetched == [topics.delta(FED, 6)]


def test_one_version_per_round_hears_one_announcement_per_round(
    broker: Mosquitto, pair: tuple[Device, FakeAggregator]
) -> None:
    """Each update makes the next version (a buffer of every device: nothing is published
    while the device trains): it stays subscribed, hearing about one announcement per round,
    not also the retained one of the version it holds on subscribing again
    (edge_agent.relisten)."""
    device, aggregator = pair

    def slow(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        time.sleep(0.3)  # long enough for the lead: only the advance keeps it listening
        return X, y

    agent = EdgeAgent(device.config(broker), data_transform=slow)
    stop = threading.Event()

    def publish() -> None:
        published = 0
        aggregator.publish_model(1)
        while not stop.is_set():
            n = len(aggregator.received())
            if n > published:
                published = n
                aggregator.publish_model(n + 1)
            stop.wait(0.01)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(4, timeout=30)  # the lead, a round and advances are measured
        heard = agent.received["announce"]
        aggregator.wait_updates(10, timeout=30)
        heard = agent.received["announce"] - heard
    finally:
        stop.set()
        publisher.join(10)
        runner.stop()
    bases = [u.base_version for u in aggregator.received()]
    assert bases[3:10] == list(range(4, 11)), bases  # every version, one round each
    assert heard <= 6 + 1, f"{heard} announcements heard in 6 rounds"


@pytest.mark.usefixtures("unmeasured")
def test_announce_wait_s_bounds_the_wait_before_a_repeated_round(
    broker: Mosquitto, pair: tuple[Device, FakeAggregator]
) -> None:
    """No announcement on the broker (as on a node that lost its retained messages): the device
    fetches the model (it has none), trains, and retrains it once ``announce_wait_s`` after
    subscribing to the announcements has passed without one, not the default 3 s."""
    device, aggregator = pair
    aggregator.publish_spec()
    aggregator.publish(topics.model(FED), model_payload(1, device.aggregator))
    cfg = device.config(
        broker,
        training={"interval_s": 0.2, "max_updates_per_version": 0, "announce_wait_s": 0.2},
    )
    agent = EdgeAgent(cfg)
    runner = AgentThread(agent)
    try:
        since = wait_until(lambda: agent.listening_since)
        aggregator.wait_updates(2)
        waited = time.monotonic() - since
        assert agent.listening_since == since  # subscribed throughout (interval <= 1 s)
    finally:
        runner.stop()
    assert [u.base_version for u in aggregator.received()[:2]] == [1, 1]
    assert waited < 2.0, f"the repeated round came {waited:.1f} s after subscribing"
