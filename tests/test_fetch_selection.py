"""A device decides from the announced version whether it trains on it, and fetches only the
versions it trains on or evaluates (fedmqtt.cohort.Selection.evaluates): real agents, a real
Mosquitto, a fake aggregator that publishes signed models, plans and announcements."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_agent_helpers import FED, AgentThread, FakeAggregator, make_device, wait_until

from edge_agent.agent import EdgeAgent
from fedmqtt import topics, wire
from fedmqtt.cohort import Selection, draw
from fedmqtt.fedeval import decode_report
from simulator.broker import Mosquitto

VERSIONS = range(1, 13)


class EvalListener:
    """Collects the versions of the evaluation reports that reach the broker."""

    def __init__(self, broker: Mosquitto, key: Any) -> None:
        self.versions: list[int] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="eval-listener")
        c.on_connect = lambda cl, *a: cl.subscribe(topics.eval_filter(FED), 1)
        c.on_subscribe = lambda *a: subscribed.set()
        c.on_message = self._on_message
        self.key = key
        self.client = c
        c.connect(broker.host, broker.port, keepalive=10)
        c.loop_start()
        assert subscribed.wait(5)

    def _on_message(self, client: paho.Client, u: Any, msg: paho.MQTTMessage) -> None:
        env = wire.open_envelope(bytes(msg.payload))
        env.verify(self.key)  # signed with the device's update key
        report = decode_report(env)
        with self._lock:
            self.versions.append(report.version)

    def seen(self) -> list[int]:
        with self._lock:
            return list(self.versions)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("evaluation", [False, True], ids=["eval-off", "eval-on"])
def test_a_device_fetches_only_the_versions_it_trains_on(
    broker: Mosquitto, tmp_path: Path, evaluation: bool
) -> None:
    """Participation 0.3, window 1: versions 1-12 are published one after the other. The
    device (in the cohort) fetches v1 (it has no model) and then exactly the versions its draw
    selects, trains on each of those, and counts every other version as skipped. With
    evaluation on it reports each version it fetched (before training), and fetches no
    more: a device of the cohort evaluates the versions it trains on."""
    sel = Selection(participation=0.3, window=1)
    device = make_device(tmp_path / "dev-1")
    chosen = [v for v in VERSIONS if sel.trains(FED, device.device_id, {}, v)]
    assert 2 <= len(chosen) <= 8 and 1 not in chosen, chosen  # the draw gives a real mix
    tables: dict[str, dict[str, Any]] = {"evaluation": {"fraction": 0.2}} if evaluation else {}
    agent = EdgeAgent(device.config(broker, **tables))
    agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    listener = EvalListener(broker, device.key)
    try:
        agg.publish_plan(1, selection=sel)
        agg.publish_model(1)  # retained before the agent starts: its first fetch finds it
        runner = AgentThread(agent)
        try:
            for v in VERSIONS:
                if v > 1:
                    agg.publish_model(v)
                if v in chosen:
                    wait_until(lambda v=v: v in [u.base_version for u in agg.received()])
                else:
                    wait_until(lambda v=v: agent.rounds_skipped == v - chosen_before(chosen, v))
        finally:
            runner.stop()
        fetched = [1, *chosen]
        assert [u.base_version for u in agg.received()] == chosen
        assert agent.fetches == agent.received["model"] == len(fetched)
        assert agent.rounds_skipped == len(VERSIONS) - len(chosen)
        if evaluation:
            wait_until(lambda: len(listener.seen()) >= len(fetched))
            assert sorted(listener.seen()) == fetched
        else:
            assert listener.seen() == []
    finally:
        listener.close()
        agg.close()


def chosen_before(chosen: list[int], v: int) -> int:
    return sum(1 for c in chosen if c <= v)


def test_a_device_outside_the_cohort_fetches_one_version_per_window_to_evaluate(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """The plan selects site=north with participation 0.5 per 2-version window; the device
    is tagged site=south, so it never trains. With evaluation on it fetches v1 (no model)
    and then the first version of each window its draw selects, and reports each; with
    evaluation off it fetches nothing after v1."""
    sel = Selection(tags=("site=north",), participation=0.5, window=2)
    device = make_device(tmp_path / "dev-9", device_id="dev-9")
    windows = sorted({sel.window_of(v) for v in VERSIONS})
    drawn = [w for w in windows if draw(FED, "dev-9", w) < 0.5]
    assert 2 <= len(drawn) <= len(windows) - 2, drawn  # a real mix
    expected = sorted({1, *(max(1, w * 2) for w in drawn)})
    agent = EdgeAgent(
        device.config(broker, device={"tags": {"site": "south"}}, evaluation={"fraction": 0.2})
    )
    agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    listener = EvalListener(broker, device.key)
    try:
        agg.publish_plan(1, selection=sel)
        agg.publish_model(1)
        runner = AgentThread(agent)
        try:
            for v in VERSIONS:
                if v > 1:
                    agg.publish_model(v)
                wait_until(lambda v=v: agent.rounds_skipped == v)
                if v in expected:
                    wait_until(lambda v=v: v in listener.seen())
        finally:
            runner.stop()
        assert agg.received() == []
        assert agent.fetches == agent.received["model"] == len(expected)
        assert sorted(listener.seen()) == expected
    finally:
        listener.close()
        agg.close()


def test_repeated_rounds_stop_once_a_newer_version_is_announced_that_it_skips(
    broker: Mosquitto, tmp_path: Path
) -> None:
    """A device retraining its version every 0.2 s (max_updates_per_version = 0) stops once a
    newer version is announced that the plan does not select it for: it neither fetches that
    version nor keeps sending updates from the old one (at most the round under way ends)."""
    sel = Selection(participation=0.5, window=1)
    device = make_device(tmp_path / "dev-1")
    a = next(
        v
        for v in range(1, 200)
        if sel.trains(FED, "dev-1", {}, v) and not sel.trains(FED, "dev-1", {}, v + 1)
    )
    training = {"max_updates_per_version": 0, "interval_s": 0.2}
    agent = EdgeAgent(device.config(broker, training=training))
    agg = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    try:
        agg.publish_plan(1, selection=sel)
        agg.publish_model(a)
        runner = AgentThread(agent)
        try:
            agg.wait_updates(3)  # retraining version a
            agg.announce(a + 1)
            wait_until(lambda: agent.rounds_skipped == 1)
            n = len(agg.received())
            t0 = time.monotonic()
            # An observation window of five intervals: without the rule, ~5 more updates.
            wait_until(lambda: time.monotonic() - t0 >= 1.0)
        finally:
            runner.stop()
        assert len(agg.received()) <= n + 1
        assert agent.fetches == 1 and agent.current_version == a
    finally:
        agg.close()
