"""A personalising agent over a real broker: it sends ordinary updates of the global model, keeps
its personal model in its state directory across a restart, never sends it (every byte on the
broker is inspected), and ``edge-agent predict`` runs it."""

from __future__ import annotations

import io
import json
import threading
from pathlib import Path

import numpy as np
import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from test_agent_helpers import (
    FED,
    SPEC,
    AgentThread,
    Device,
    FakeAggregator,
    global_model,
    make_device,
    wait_until,
)

from edge_agent.agent import EdgeAgent
from edge_agent.personal import PersonalModel, PersonalStore
from edge_agent.predictor import EXIT_OK, predict_cli
from fedmqtt.codecs import decode_params
from fedmqtt.models.dense import forward
from fedmqtt.models.personal import train_head
from fedmqtt.models.train import TrainConfig
from fedmqtt.rand import LightRandom, seed_of
from simulator.broker import Mosquitto

pytestmark = pytest.mark.timeout(60)
PERSONALISE = {"mode": "head", "head_epochs": 3, "onnx": True}  # predict runs the stored ONNX
PLAN = {"epochs": 1, "lr": 0.1, "batch_size": 32, "momentum": 0.9, "codec": "raw"}


class Wiretap:
    """Every payload published on the broker, whatever the topic."""

    def __init__(self, broker: Mosquitto) -> None:
        self.payloads: list[bytes] = []
        self._lock = threading.Lock()
        ready = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id="wiretap", protocol=paho.MQTTv5)
        c.on_connect = lambda client, *a: client.subscribe("#", qos=1)
        c.on_subscribe = lambda *a: ready.set()
        c.on_message = self._on_message
        c.connect(broker.host, broker.port)
        c.loop_start()
        assert ready.wait(5)
        self.client = c

    def _on_message(self, client: paho.Client, u: object, msg: paho.MQTTMessage) -> None:
        with self._lock:
            self.payloads.append(bytes(msg.payload))

    def close(self) -> list[bytes]:
        self.client.loop_stop()
        self.client.disconnect()
        with self._lock:
            return list(self.payloads)


def personal_at(device: Device, version: int) -> PersonalModel:
    store = PersonalStore(device.state_dir)

    def built() -> PersonalModel | None:
        pm = store.load(device.device_id, FED)
        return pm if pm is not None and pm.version == version else None

    pm = wait_until(built)
    assert isinstance(pm, PersonalModel)
    return pm


def test_personal_model_is_kept_used_and_never_sent(broker: Mosquitto, tmp_path: Path) -> None:
    device = make_device(tmp_path / "dev-1")
    aggregator = FakeAggregator(broker, device.aggregator, {device.device_id: device.key})
    try:
        check_personal_device(broker, device, aggregator, tmp_path)
    finally:
        aggregator.close()


def check_personal_device(
    broker: Mosquitto, device: Device, aggregator: FakeAggregator, tmp_path: Path
) -> None:
    tap = Wiretap(broker)
    aggregator.publish_plan(**PLAN)
    aggregator.publish_model(1)
    agent = EdgeAgent(device.config(broker, personalise=PERSONALISE))
    runner = AgentThread(agent)
    try:
        aggregator.wait_updates(1)
        pm1 = personal_at(device, 1)
    finally:
        runner.stop()
    # A restart: the personal model comes back from the state directory, and the next head
    # is trained from it (not from the global head).
    agent = EdgeAgent(device.config(broker, personalise=PERSONALISE))
    runner = AgentThread(agent)
    try:
        wait_until(lambda: agent.personaliser.current is not None)
        assert agent.personaliser.current.version == 1
        aggregator.publish_model(2)
        updates = aggregator.wait_updates(2)
        pm2 = personal_at(device, 2)
    finally:
        runner.stop()
    sent = tap.close()
    assert pm2.onnx is not None

    data = np.load(device.root / "data" / "shard.npz")
    X, y = data["X"], data["y"]
    g2 = global_model(2)
    train = TrainConfig(epochs=PERSONALISE["head_epochs"], lr=0.1, batch_size=32, momentum=0.9)
    expected = train_head(
        SPEC, g2.params, pm1.params, X, y, config=train, rng=LightRandom(seed_of(7, 1, 1))
    )
    for k in expected:
        np.testing.assert_array_equal(pm2.params[k], expected[k])
    from_global_head = train_head(
        SPEC, g2.params, None, X, y, config=train, rng=LightRandom(seed_of(7, 1, 1))
    )
    assert not np.allclose(pm2.params["W0"], from_global_head["W0"])

    # The updates are the ordinary deltas of the global model ...
    u2 = next(u for u in updates if u.base_version == 2)
    delta = SPEC.layout().unflatten(decode_params(u2.delta, SPEC.layout()))
    personal_delta = pm2.params["W0"] - g2.params["W0"]
    assert not np.allclose(delta["W0"], personal_delta, atol=1e-3)
    # ... and no byte sequence of a personal model went over the broker.
    assert len(sent) >= 4
    for pm in (pm1, pm2):
        for name, tensor in pm.params.items():
            raw = np.asarray(tensor, "<f4").tobytes()
            for start in range(0, max(1, len(raw) - 64), 512):
                window = raw[start : start + 64]
                assert not any(window in payload for payload in sent), name
        for payload in sent:
            assert pm.onnx is None or pm.onnx[-256:] not in payload

    # `edge-agent predict` runs the personal model (same numbers as numpy).
    config = device.write_toml(broker, personalise=PERSONALISE, inference={"onnx": False})
    csv_path = tmp_path / "in.csv"
    np.savetxt(csv_path, X[:50], delimiter=",", fmt="%.6g")
    out, err = io.StringIO(), io.StringIO()
    assert predict_cli(config, csv_path, "json", out, err=err) == EXIT_OK, err.getvalue()
    assert "personal model (head) from version 2" in err.getvalue()
    probs = np.array(
        [list(json.loads(line)["probabilities"].values()) for line in out.getvalue().splitlines()]
    )
    X50 = np.loadtxt(csv_path, delimiter=",", dtype=np.float32)
    np.testing.assert_allclose(probs, forward(SPEC, pm2.params, X50), rtol=1e-4, atol=1e-5)
    # With personalisation off, the same device predicts with the signed global model.
    plain = device.write_toml(broker)
    err = io.StringIO()
    assert predict_cli(plain, csv_path, "json", io.StringIO(), err=err) == EXIT_OK
    assert "model version 2" in err.getvalue() and "personal" not in err.getvalue()
